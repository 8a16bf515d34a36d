"""Where the batch jobs' heavy loops run: this process (`LocalExecutor`) or a Ray cluster (`RayExecutor`).

Its own room because both the feature cache (`training.fit.features`) and the catalogue embedding
(`index.embed`, `index.build`) take an executor; it is neither fitting nor the model.
"""
