// Shop the Look page: choose a photo, draw the item's box, pick a category and filters, see the products.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere: it talks only to this service.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    photoInput: $("photo-input"), dropZone: $("drop-zone"), examples: $("examples"), exampleList: $("example-list"),
    stage: $("stage"), scene: $("scene"), box: $("box"), noPreview: $("no-preview"), boxValue: $("box-value"),
    clearBox: $("clear-box"), form: $("search-form"), category: $("category"), pageSize: $("page-size"),
    search: $("search"), filters: $("filters"), brandFilter: $("brand-filter"), brandOptions: $("brand-options"),
    colourFilter: $("colour-filter"), colourOptions: $("colour-options"), priceFilter: $("price-filter"),
    priceMin: $("price-min"), priceMax: $("price-max"), stockFilter: $("stock-filter"), inStock: $("in-stock"),
    filterValue: $("filter-value"), error: $("error"), meta: $("meta"), fallback: $("fallback"), mode: $("mode"),
    took: $("took"), note: $("note"), results: $("results"), more: $("more"), keyPanel: $("key-panel"),
    apiKey: $("api-key"), keyPrompt: $("key-prompt"), detections: $("detections"), detected: $("detected"),
    detectStatus: $("detect-status"), detectedList: $("detected-list"), shopLook: $("shop-look"),
  };

  // The API lives beside the page: resolving against the page's own folder keeps working behind a path prefix.
  const BASE = new URL(".", document.baseURI);
  const api = (path) => new URL(String(path).replace(/^\//, ""), BASE);
  const MIN_BOX = 0.02; // smallest box side (normalised) a drag keeps; a mere click clears the box
  const KEY_STEP = 0.01;
  const KEY_STORE = "stl-api-key";

  const state = {
    file: null, fileName: "photo.jpg", sceneReady: false, objectUrl: null,
    box: null, // {l, t, r, b} normalised to [0, 1], origin top-left; null = the whole photo
    facets: null, // {colourKey} when the filter panel is shown
    query: null, // the search "show more" continues: {kind: "recommend"|"similar"|"shop", productId, title, k, filter}
    shown: 0, request: 0,
    detected: [], // the items /detect found in the photo: {bbox: [l, t, r, b], category, score}
    photoRequest: 0, // the newest photo chosen: one still being downscaled is dropped for it
    detectRequest: 0,
  };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // ------------------------------------------------------------------ talking to the API

  function headers() {
    const key = el.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /** The API's own words for a failed response: {"detail": "..."} or FastAPI's 422 list, else the status. */
  async function errorText(response) {
    let text = "";
    let body = null;
    try { text = await response.text(); body = JSON.parse(text); } catch (_) { /* not JSON: shown as text */ }
    const detail = body && typeof body === "object" ? body.detail : undefined;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail)) {
      return detail.map((problem) => {
        if (!problem || typeof problem !== "object") return String(problem);
        const where = Array.isArray(problem.loc) ? problem.loc.filter((part) => !["body", "query", "path"].includes(part)).join(".") : "";
        return (where ? `${where}: ` : "") + (problem.msg || JSON.stringify(problem));
      }).join("; ");
    }
    if (detail !== undefined && detail !== null) return JSON.stringify(detail);
    const status = `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
    return text ? `${status}: ${text.slice(0, 300)}` : status;
  }

  async function call(path, options = {}) {
    let response;
    try {
      response = await fetch(api(path), { ...options, headers: { ...headers(), ...(options.headers || {}) } });
    } catch (error) {
      throw new ApiError(0, `Could not reach the service (${error.message || error}).`);
    }
    if (!response.ok) throw new ApiError(response.status, await errorText(response));
    return response;
  }

  const getJson = async (path, options) => (await call(path, options)).json();

  // ------------------------------------------------------------------ messages

  function showError(error) {
    const message = error instanceof Error ? error.message : String(error);
    el.error.textContent = message || "Something went wrong.";
    el.error.hidden = false;
    if (error instanceof ApiError && error.status === 401) {
      el.keyPanel.open = true;
      el.keyPrompt.hidden = false;
      el.apiKey.focus();
    }
  }

  function clearMessages() {
    el.error.hidden = true;
    el.error.textContent = "";
    el.keyPrompt.hidden = true;
  }

  // ------------------------------------------------------------------ the photo

  // A photo longer than this a side is sent downscaled, as a JPEG: the service decodes the upload on every
  // request (a 7 MP phone photo: ~22 ms of its ~33 ms /recommend and 78 ms /shop, against 14 and 44 ms at
  // 1008x1260), and the items of a photo this size still crop to more than the model's 224 px. Boxes are
  // normalised, so they mean the same on either; the page keeps showing the original.
  const MAX_UPLOAD_SIDE = 1600;

  async function uploadable(blob) {
    if (typeof createImageBitmap !== "function") return blob;
    let bitmap;
    try {
      bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" }); // EXIF rotation applied
    } catch {
      return blob; // not a picture this browser decodes: the service says what is wrong with it
    }
    const scale = MAX_UPLOAD_SIDE / Math.max(bitmap.width, bitmap.height);
    if (!(scale < 1)) {
      bitmap.close();
      return blob;
    }
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const context = canvas.getContext("2d");
    context.imageSmoothingQuality = "high";
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    const smaller = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
    return smaller || blob;
  }

  async function setPhoto(blob, name) {
    const id = ++state.photoRequest;
    const sent = await uploadable(blob);
    if (id !== state.photoRequest) return; // another photo was chosen meanwhile
    state.file = sent;
    state.fileName = name || blob.name || "photo.jpg";
    state.sceneReady = false;
    setBox(null);
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(blob);
    el.noPreview.hidden = true;
    el.stage.hidden = false;
    el.scene.alt = `Your photo: ${state.fileName}`;
    el.scene.src = state.objectUrl;
    clearMessages();
    detectItems();
  }

  // ------------------------------------------------------------------ detected items and the whole look

  const shortName = (path) => String(path || "").split("|").pop();

  function showDetections(items) {
    state.detected = items;
    el.detections.replaceChildren();
    el.detectedList.replaceChildren();
    items.forEach((item, index) => {
      const [l, t, r, b] = item.bbox;
      const outline = document.createElement("div");
      outline.className = "detection";
      outline.dataset.index = String(index);
      outline.dataset.category = item.category;
      Object.assign(outline.style, {
        left: `${l * 100}%`, top: `${t * 100}%`, width: `${(r - l) * 100}%`, height: `${(b - t) * 100}%`,
      });
      const tag = document.createElement("span");
      tag.textContent = shortName(item.category);
      outline.append(tag);
      el.detections.append(outline);
      const entry = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "detected-item";
      button.dataset.index = String(index);
      button.textContent = `${shortName(item.category)} · ${Number(item.score).toFixed(2)}`;
      button.setAttribute("aria-label", `Search the ${shortName(item.category)} found in the photo`);
      button.addEventListener("click", () => chooseDetection(index));
      entry.append(button);
      el.detectedList.append(entry);
    });
    el.shopLook.hidden = items.length === 0;
    el.detected.hidden = false;
    el.detectStatus.textContent = items.length
      ? `Found ${items.length} item${items.length === 1 ? "" : "s"}: tap one to search it, or shop the whole look.`
      : "No items found in this photo: draw a box around one.";
  }

  function hideDetections(reason) {
    state.detected = [];
    el.detections.replaceChildren();
    el.detectedList.replaceChildren();
    el.shopLook.hidden = true;
    el.detected.hidden = !reason;
    el.detectStatus.textContent = reason || "";
  }

  async function detectItems() {
    const id = ++state.detectRequest;
    hideDetections("");
    if (!state.file) return;
    const form = new FormData();
    form.append("image", state.file, state.fileName);
    try {
      const answer = await getJson("detect", { method: "POST", body: form });
      if (id !== state.detectRequest) return;
      const items = (Array.isArray(answer.items) ? answer.items : []).filter(
        (item) => Array.isArray(item.bbox) && item.bbox.length === 4 && item.bbox.every(Number.isFinite));
      showDetections(items);
    } catch (error) {
      if (id !== state.detectRequest) return;
      // No detector in this version (503), or no key yet: drawing a box still works.
      hideDetections(error instanceof ApiError && error.status === 503 ? "" : `Item detection: ${error.message}`);
    }
  }

  function detectionAt(point) {
    // The smallest detected box holding the point: nested items (a bag on a coat) stay reachable.
    let found = -1;
    let area = Infinity;
    state.detected.forEach((item, index) => {
      const [l, t, r, b] = item.bbox;
      if (point.x >= l && point.x <= r && point.y >= t && point.y <= b && (r - l) * (b - t) < area) {
        found = index;
        area = (r - l) * (b - t);
      }
    });
    return found;
  }

  async function chooseDetection(index) {
    const item = state.detected[index];
    if (!item) return;
    const [l, t, r, b] = item.bbox;
    setBox({ l, t, r, b });
    for (const outline of el.detections.children) outline.classList.toggle("chosen", outline.dataset.index === String(index));
    const option = Array.from(el.category.options).find((entry) => entry.value === item.category);
    if (option) {
      el.category.value = option.value;
      await loadFacets(option.value);
    }
    if (el.category.value === item.category) startSearch(photoQuery());
    else showError(`The detected category ${item.category} cannot be searched here.`);
  }

  el.shopLook.addEventListener("click", () => {
    clearMessages();
    if (!state.file) { showError("Choose a photo first."); return; }
    startSearch({ kind: "shop", k: Math.min(Number(el.pageSize.value) || 12, 8) });
  });

  el.scene.addEventListener("load", () => { state.sceneReady = true; });
  el.scene.addEventListener("error", () => {
    // Not a picture this browser can show; the service still gets to say what is wrong with it.
    if (!state.file) return;
    state.sceneReady = false;
    el.stage.hidden = true;
    el.noPreview.hidden = false;
  });

  el.photoInput.addEventListener("change", () => {
    const file = el.photoInput.files && el.photoInput.files[0];
    if (file) setPhoto(file, file.name);
  });

  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault(); // without it the browser opens the dropped file instead
    el.dropZone.classList.add("over");
  });
  document.addEventListener("dragleave", () => el.dropZone.classList.remove("over"));
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    el.dropZone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) setPhoto(file, file.name);
  });

  document.addEventListener("paste", (event) => {
    const target = event.target;
    if (target instanceof HTMLInputElement && target.type !== "file") return; // pasting an API key, a price
    const items = event.clipboardData ? Array.from(event.clipboardData.items) : [];
    const item = items.find((entry) => entry.kind === "file" && entry.type.startsWith("image/"));
    const file = item && item.getAsFile();
    if (!file) return;
    event.preventDefault();
    setPhoto(file, file.name || `pasted.${file.type.split("/")[1] || "png"}`);
  });

  // ------------------------------------------------------------------ the box: pointer, touch and keys

  const clamp = (value, low, high) => Math.min(high, Math.max(low, value));

  function setBox(box) {
    state.box = box;
    if (!box) {
      el.box.hidden = true;
      el.boxValue.textContent = "Box: the whole photo";
      return;
    }
    el.box.hidden = false;
    Object.assign(el.box.style, {
      left: `${box.l * 100}%`, top: `${box.t * 100}%`,
      width: `${(box.r - box.l) * 100}%`, height: `${(box.b - box.t) * 100}%`,
    });
    el.boxValue.textContent = `Box (left, top, right, bottom): ${bboxText(box)}`;
  }

  const bboxText = (box) => [box.l, box.t, box.r, box.b].map((value) => value.toFixed(4)).join(",");

  function pointAt(event) {
    const rect = el.scene.getBoundingClientRect();
    return {
      x: clamp((event.clientX - rect.left) / rect.width, 0, 1),
      y: clamp((event.clientY - rect.top) / rect.height, 0, 1),
    };
  }

  const spanning = (a, b) => ({
    l: Math.min(a.x, b.x), t: Math.min(a.y, b.y), r: Math.max(a.x, b.x), b: Math.max(a.y, b.y),
  });

  let drag = null;
  el.stage.addEventListener("pointerdown", (event) => {
    if (!state.sceneReady || event.button > 0) return;
    const point = pointAt(event);
    const handle = event.target.dataset ? event.target.dataset.handle : undefined;
    if (handle && state.box) {
      // The corner opposite the one grabbed stays put.
      const box = state.box;
      const anchor = { x: handle.includes("w") ? box.r : box.l, y: handle.includes("n") ? box.b : box.t };
      drag = { mode: "resize", anchor };
    } else if (event.target === el.box && state.box) {
      drag = { mode: "move", start: point, box: { ...state.box }, previous: state.box };
    } else {
      drag = { mode: "draw", anchor: point, previous: state.box };
      setBox(spanning(point, point));
    }
    el.stage.setPointerCapture(event.pointerId);
    event.preventDefault();
  });

  el.stage.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const point = pointAt(event);
    if (drag.mode === "move") {
      const { box, start } = drag;
      const dx = clamp(point.x - start.x, -box.l, 1 - box.r);
      const dy = clamp(point.y - start.y, -box.t, 1 - box.b);
      setBox({ l: box.l + dx, t: box.t + dy, r: box.r + dx, b: box.b + dy });
    } else {
      setBox(spanning(drag.anchor, point));
    }
  });

  function endDrag(event) {
    if (!drag) return;
    const ended = drag;
    drag = null;
    if (el.stage.hasPointerCapture(event.pointerId)) el.stage.releasePointerCapture(event.pointerId);
    const box = state.box;
    const tapped = ended.mode === "move" ? box === ended.box || sameBox(box, ended.box)
      : box && (box.r - box.l < MIN_BOX || box.b - box.t < MIN_BOX);
    // A tap (no drag) inside a detected item chooses it and searches.
    const chosen = tapped ? detectionAt(pointAt(event)) : -1;
    if (chosen >= 0) {
      chooseDetection(chosen);
      return;
    }
    if (ended.mode === "draw" && tapped) setBox(null);
    else if (box) el.box.focus({ preventScroll: true });
  }

  const sameBox = (a, b) => Boolean(a && b) && ["l", "t", "r", "b"].every((key) => Math.abs(a[key] - b[key]) < 1e-6);
  el.stage.addEventListener("pointerup", endDrag);
  el.stage.addEventListener("pointercancel", endDrag);

  el.box.addEventListener("keydown", (event) => {
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    const move = moves[event.key];
    if (!move || !state.box) return;
    event.preventDefault();
    const [dx, dy] = move.map((sign) => sign * KEY_STEP);
    const box = { ...state.box };
    if (event.shiftKey) { // resize: the right and bottom edges follow the arrows
      box.r = clamp(box.r + dx, box.l + MIN_BOX, 1);
      box.b = clamp(box.b + dy, box.t + MIN_BOX, 1);
    } else {
      const x = clamp(dx, -box.l, 1 - box.r);
      const y = clamp(dy, -box.t, 1 - box.b);
      Object.assign(box, { l: box.l + x, r: box.r + x, t: box.t + y, b: box.b + y });
    }
    setBox(box);
  });

  el.clearBox.addEventListener("click", () => setBox(null));

  // ------------------------------------------------------------------ categories and filters

  async function loadCategories() {
    try {
      const answer = await getJson("categories");
      const categories = Array.isArray(answer.categories) ? answer.categories : [];
      el.category.replaceChildren(new Option("Pick a category", ""));
      for (const category of categories) {
        const count = Number.isFinite(category.products) ? ` (${category.products})` : "";
        const served = category.indexed === false ? " (popular picks only)" : "";
        el.category.add(new Option(`${category.name || category.path}${count}${served}`, category.path));
      }
    } catch (error) {
      el.category.replaceChildren(new Option("No categories", ""));
      showError(error);
    }
  }

  function checkboxes(container, counts, name) {
    container.replaceChildren();
    for (const [value, count] of Object.entries(counts)) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.name = name;
      box.value = value;
      label.append(box, ` ${value}`);
      if (Number.isFinite(count)) {
        const small = document.createElement("small");
        small.textContent = ` (${count})`;
        label.append(small);
      }
      container.append(label);
    }
  }

  const isCounts = (value) => value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length > 0;
  const number = (value) => (typeof value === "number" && Number.isFinite(value) ? value : null);

  async function loadFacets(category) {
    state.facets = null;
    el.filters.hidden = true;
    if (!category) return;
    let answer;
    try {
      answer = await getJson(`facets?category=${encodeURIComponent(category)}`);
    } catch (_) {
      return; // no product data (404/400) or an older service: no filter panel
    }
    if (el.category.value !== category || !answer || typeof answer !== "object") return;
    const labels = answer.labels && typeof answer.labels === "object" ? answer.labels : {};
    const colourKey = ["colour", "color"].find((key) => isCounts(labels[key]));
    const brands = isCounts(answer.brands) ? answer.brands : null;
    const price = answer.price && typeof answer.price === "object" ? answer.price : {};
    const low = number(price.min) ?? number(answer.price_min);
    const high = number(price.max) ?? number(answer.price_max);
    const stock = number(answer.in_stock);

    el.brandFilter.hidden = !brands;
    checkboxes(el.brandOptions, brands || {}, "brand");
    el.colourFilter.hidden = !colourKey;
    checkboxes(el.colourOptions, colourKey ? labels[colourKey] : {}, "colour");
    el.priceFilter.hidden = low === null && high === null;
    el.priceMin.value = "";
    el.priceMax.value = "";
    el.priceMin.placeholder = low === null ? "" : String(low);
    el.priceMax.placeholder = high === null ? "" : String(high);
    el.stockFilter.hidden = stock === null;
    el.inStock.checked = true;
    if (!brands && !colourKey && el.priceFilter.hidden && el.stockFilter.hidden) return;
    state.facets = { colourKey: colourKey || "colour", stock: stock !== null };
    el.filters.hidden = false;
    showFilter();
  }

  const quoted = (value) => `"${String(value).replace(/["\\]/g, "\\$&")}"`;
  // A bare word is fine for simple values; anything with spaces, quotes or operators is quoted.
  const word = (value) => (/^[A-Za-z0-9_.+-]+$/.test(value) && !/^(and|or|not)$/i.test(value) ? value : quoted(value));
  const anyOf = (key, values, write) => {
    const terms = values.map((value) => `${key}=${write(value)}`);
    return terms.length > 1 ? `(${terms.join(" OR ")})` : terms[0];
  };
  const checked = (container) => Array.from(container.querySelectorAll("input:checked")).map((box) => box.value);

  /** The filter expression of the panel, e.g. (brand="A" OR brand="B") AND colour=red AND price<=80; "" = none. */
  function composeFilter() {
    if (!state.facets) return "";
    const clauses = [];
    const brands = checked(el.brandOptions);
    if (brands.length) clauses.push(anyOf("brand", brands, quoted));
    const colours = checked(el.colourOptions);
    if (colours.length) clauses.push(anyOf(state.facets.colourKey, colours, word));
    const low = parseFloat(el.priceMin.value);
    const high = parseFloat(el.priceMax.value);
    if (Number.isFinite(low)) clauses.push(`price>=${low}`);
    if (Number.isFinite(high)) clauses.push(`price<=${high}`);
    if (state.facets.stock) {
      // The service leaves out-of-stock products out unless a filter mentions in_stock, so "everything"
      // has to be said in so many words (two-valued logic: this also keeps products of unknown stock).
      clauses.push(el.inStock.checked ? "in_stock=true" : "(in_stock=true OR NOT in_stock=true)");
    }
    return clauses.join(" AND ");
  }

  function showFilter() {
    el.filterValue.textContent = composeFilter() || "none";
  }

  let refilterTimer = null;
  function filtersChanged(delay) {
    showFilter();
    clearTimeout(refilterTimer);
    if (!state.query) return;
    // Results on screen follow the filters: the same search again, from the first page.
    refilterTimer = setTimeout(() => startSearch({ ...state.query, filter: composeFilter() }), delay);
  }
  el.filters.addEventListener("change", (event) => filtersChanged(event.target.type === "checkbox" ? 0 : 300));
  el.filters.addEventListener("input", (event) => { if (event.target.type === "number") filtersChanged(600); });

  el.category.addEventListener("change", () => loadFacets(el.category.value));

  // ------------------------------------------------------------------ examples

  async function loadExamples() {
    let answer;
    try {
      answer = await getJson("examples");
    } catch (_) {
      return; // 404: this service has no examples; the strip stays hidden
    }
    const examples = answer && Array.isArray(answer.examples) ? answer.examples.filter((e) => e && e.image_url) : [];
    el.exampleList.replaceChildren();
    for (const example of examples) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "example";
      button.dataset.exampleId = example.id;
      const picture = document.createElement("img");
      picture.src = api(example.image_url);
      picture.alt = `Example scene ${example.id}${example.category ? ` with ${example.category}` : ""}`;
      picture.loading = "lazy";
      button.append(picture);
      button.addEventListener("click", () => useExample(example));
      item.append(button);
      el.exampleList.append(item);
    }
    el.examples.hidden = examples.length === 0;
  }

  async function useExample(example) {
    clearMessages();
    try {
      const blob = await (await call(example.image_url)).blob();
      await setPhoto(blob, `${example.id}.jpg`);
      await new Promise((resolve) => {
        if (el.scene.complete && state.sceneReady) resolve();
        el.scene.addEventListener("load", resolve, { once: true });
        el.scene.addEventListener("error", resolve, { once: true });
      });
      const box = Array.isArray(example.bbox) && example.bbox.length === 4 ? example.bbox.map(Number) : null;
      if (box && box.every(Number.isFinite)) setBox({ l: box[0], t: box[1], r: box[2], b: box[3] });
      const wanted = String(example.category || "");
      const option = Array.from(el.category.options).find(
        (entry) => entry.value && (entry.value === wanted || entry.value.split("|").pop() === wanted));
      if (option) {
        el.category.value = option.value;
        await loadFacets(option.value);
      }
      if (el.category.value) startSearch(photoQuery());
    } catch (error) {
      showError(error);
    }
  }

  // ------------------------------------------------------------------ searching and results

  const photoQuery = () => ({ kind: "recommend", k: Number(el.pageSize.value) || 12, filter: composeFilter() });

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    clearMessages();
    if (!state.file) { showError("Choose a photo first."); return; }
    if (!el.category.value) { showError("Pick a category first."); el.category.focus(); return; }
    startSearch(photoQuery());
  });

  el.more.addEventListener("click", () => {
    if (state.query) fetchPage(state.query, state.shown, true);
  });

  function startSearch(query) {
    if (query.kind === "recommend" && (!state.file || !el.category.value)) return;
    if (query.kind === "shop" && !state.file) return;
    state.query = query;
    state.shown = 0;
    fetchPage(query, 0, false);
  }

  function request(query, offset) {
    if (query.kind === "similar") {
      const params = new URLSearchParams({ k: String(query.k), offset: String(offset) });
      if (query.filter) params.set("filter", query.filter);
      return getJson(`products/${encodeURIComponent(query.productId)}/similar?${params}`);
    }
    const form = new FormData();
    form.append("image", state.file, state.fileName);
    if (query.kind === "shop") {
      form.append("k", String(query.k));
      return getJson("shop", { method: "POST", body: form });
    }
    form.append("category", el.category.value);
    form.append("k", String(query.k));
    form.append("offset", String(offset));
    if (state.box) form.append("bbox", bboxText(state.box));
    if (query.filter) form.append("filter", query.filter);
    return getJson("recommend", { method: "POST", body: form });
  }

  async function fetchPage(query, offset, append) {
    const id = ++state.request;
    clearMessages();
    el.results.setAttribute("aria-busy", "true");
    el.search.disabled = true;
    el.more.disabled = true;
    try {
      const answer = await request(query, offset);
      if (id !== state.request) return; // a newer search has started; this answer is stale
      render(answer, query, append);
    } catch (error) {
      if (id !== state.request) return;
      if (!append) { el.results.replaceChildren(); el.meta.hidden = true; el.note.hidden = true; el.more.hidden = true; }
      showError(error);
    } finally {
      if (id === state.request) {
        el.results.setAttribute("aria-busy", "false");
        el.results.dataset.answers = String(Number(el.results.dataset.answers || 0) + 1);
        el.search.disabled = false;
        el.more.disabled = false;
      }
    }
  }

  function renderShop(answer, query) {
    const items = Array.isArray(answer.items) ? answer.items : [];
    el.results.replaceChildren();
    items.forEach((item, index) => {
      const group = document.createElement("li");
      group.className = "shop-group";
      group.dataset.category = item.category;
      group.dataset.index = String(index);
      const heading = document.createElement("h3");
      const score = number(item.score);
      heading.textContent = `${shortName(item.category)}${score === null ? "" : ` · ${score.toFixed(2)}`}` +
        (item.source === "popularity" ? " · popular picks" : "");
      group.append(heading);
      const products = document.createElement("ul");
      products.className = "grid";
      for (const product of Array.isArray(item.products) ? item.products : []) products.append(card(product));
      group.append(products);
      el.results.append(group);
    });
    state.shown = items.length;
    el.fallback.hidden = true;
    el.mode.textContent = `The whole look: ${items.length} item${items.length === 1 ? "" : "s"}`;
    const took = number(answer.took_ms);
    el.took.textContent = took === null ? "" : ` · answered in ${took < 10 ? took.toFixed(1) : Math.round(took)} ms`;
    el.meta.hidden = false;
    el.note.hidden = !answer.note && items.length > 0;
    el.note.textContent = answer.note || (items.length ? "" : "No items found in this photo.");
    el.more.hidden = true;
    if (query.k && items.length === 0) el.note.hidden = false;
  }

  function render(answer, query, append) {
    if (query.kind === "shop") { renderShop(answer, query); return; }
    const items = Array.isArray(answer.items) ? answer.items : [];
    if (!append) el.results.replaceChildren();
    for (const item of items) el.results.append(card(item));
    state.shown += items.length;

    const popular = answer.source === "popularity";
    el.fallback.hidden = !popular;
    el.fallback.textContent = popular ? `Popular picks${answer.fallback_reason ? `: ${answer.fallback_reason}` : ""}` : "";
    el.mode.replaceChildren();
    if (query.kind === "similar") {
      el.mode.append(`More like ${query.title} · `);
      const back = document.createElement("button");
      back.type = "button";
      back.className = "link";
      back.textContent = "back to my photo";
      back.disabled = !state.file;
      back.addEventListener("click", () => startSearch(photoQuery()));
      el.mode.append(back);
    } else {
      el.mode.textContent = answer.category ? `In ${answer.category}` : "";
    }
    const took = number(answer.took_ms);
    el.took.textContent = took === null ? "" : ` · answered in ${took < 10 ? took.toFixed(1) : Math.round(took)} ms`;
    el.meta.hidden = false;
    el.note.hidden = !answer.note;
    el.note.textContent = answer.note || "";
    if (!answer.note && state.shown === 0) {
      el.note.hidden = false;
      el.note.textContent = "No products to show.";
    }
    el.more.hidden = items.length < query.k; // a short page is the last one
  }

  function price(item) {
    const amount = number(item.price);
    if (amount === null) return "";
    if (item.currency) {
      try {
        return new Intl.NumberFormat(undefined, { style: "currency", currency: item.currency }).format(amount);
      } catch (_) { /* not an ISO code this browser knows */ }
    }
    return `${amount.toFixed(2)}${item.currency ? ` ${item.currency}` : ""}`;
  }

  function colours(item) {
    const labels = item.labels && typeof item.labels === "object" ? item.labels : {};
    const found = labels.colour ?? labels.color;
    return found === undefined || found === null ? [] : (Array.isArray(found) ? found : [found]).map(String);
  }

  function line(className, text) {
    const paragraph = document.createElement("p");
    paragraph.className = className;
    paragraph.textContent = text;
    return paragraph;
  }

  function thumbnail(item, title) {
    const frame = document.createElement("div");
    frame.className = "thumb";
    if (!item.image_url) return frame;
    const picture = document.createElement("img");
    picture.alt = title;
    picture.decoding = "async";
    picture.addEventListener("error", () => picture.remove()); // falls back to the empty frame
    if (el.apiKey.value.trim()) {
      // An <img> cannot send the Authorization header: fetch it, show the bytes.
      call(item.image_url).then((response) => response.blob())
        .then((blob) => { picture.src = URL.createObjectURL(blob); })
        .catch(() => picture.remove());
    } else {
      picture.src = api(item.image_url);
    }
    frame.append(picture);
    return frame;
  }

  function card(item) {
    const title = item.title || item.product_id;
    const entry = document.createElement("li");
    entry.className = "card";
    entry.dataset.productId = item.product_id;
    entry.dataset.rank = String(item.rank ?? "");
    const itemColours = colours(item);
    entry.dataset.colour = itemColours.join(" ");
    entry.append(thumbnail(item, title));
    const heading = document.createElement("h3");
    heading.className = "title";
    heading.textContent = title;
    entry.append(heading);
    if (item.brand) entry.append(line("brand", item.brand));
    const cost = price(item);
    if (cost) entry.append(line("price", cost));
    if (itemColours.length) entry.append(line("colour", `Colour: ${itemColours.join(", ")}`));
    if (item.in_stock === false) entry.append(line("stock", "Out of stock"));
    const score = number(item.score);
    entry.append(line("score", `#${item.rank ?? "?"}${score === null ? "" : ` · score ${score.toFixed(3)}`}`));
    if (typeof item.url === "string" && /^https?:\/\//i.test(item.url)) {
      const link = document.createElement("a");
      link.href = item.url;
      link.rel = "noopener noreferrer";
      link.target = "_blank";
      link.textContent = "View in shop";
      entry.append(link);
    }
    const similar = document.createElement("button");
    similar.type = "button";
    similar.className = "similar";
    similar.textContent = "More like this";
    similar.setAttribute("aria-label", `More like ${title}`);
    similar.addEventListener("click", () => {
      clearMessages();
      startSearch({ kind: "similar", productId: item.product_id, title, k: Number(el.pageSize.value) || 12,
        filter: composeFilter() });
      el.results.scrollIntoView({ behavior: "smooth", block: "start" });
    });
    entry.append(similar);
    return entry;
  }

  // ------------------------------------------------------------------ start

  el.apiKey.value = sessionStorage.getItem(KEY_STORE) || "";
  el.apiKey.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, el.apiKey.value.trim());
    el.keyPrompt.hidden = true;
  });

  loadCategories();
  loadExamples();
})();
