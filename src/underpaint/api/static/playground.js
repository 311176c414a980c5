// Underpaint playground: a page over the public API only (the same calls any client makes).
// No build step, no dependencies. The API key stays in this browser's localStorage.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const VOCAB = JSON.parse($("underpaint-vocabulary").textContent);
  const KEY_STORE = "underpaint.apiKey";
  const THEME_STORE = "underpaint.theme";
  const PARAMS_STORE = "underpaint.params.";
  const POLL_MS = 700;
  const TERMINAL = new Set(["TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"]);
  const STATUS_LABEL = {
    TASK_STATUS_QUEUED: "queued",
    TASK_STATUS_PROCESSING: "running",
    TASK_STATUS_SUCCEED: "done",
    TASK_STATUS_FAILED: "failed",
  };

  const state = {
    key: localStorage.getItem(KEY_STORE) || "",
    models: { checkpoint: [], vae: [], lora: [], textualinversion: [], controlnet: [], ipadapter: [], upscaler: [] },
    mode: "img2img", // the task type the form submits (the tabs above it)
    init: null, // {b64, width, height, name}
    cancelSupported: false,
    jobs: new Map(), // task_id -> {el, timer}
    shown: new Set(), // task ids whose images are in the gallery
  };

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.reason = (body && body.reason) || "";
    }
  }

  async function api(method, path, body, headers = {}) {
    const init = { method, headers: { Authorization: `Bearer ${state.key}`, ...headers } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    let data = null;
    try { data = await res.json(); } catch (_) { /* not JSON */ }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  // ---------------------------------------------------------------- theme

  function applyTheme(theme) {
    if (theme) document.documentElement.dataset.theme = theme;
    else delete document.documentElement.dataset.theme;
  }
  applyTheme(localStorage.getItem(THEME_STORE));
  $("theme-toggle").addEventListener("click", () => {
    const dark = document.documentElement.dataset.theme
      ? document.documentElement.dataset.theme === "dark"
      : matchMedia("(prefers-color-scheme: dark)").matches;
    const next = dark ? "light" : "dark";
    localStorage.setItem(THEME_STORE, next);
    applyTheme(next);
  });

  // ---------------------------------------------------------------- banner / errors

  function banner(text) {
    const el = $("banner");
    el.textContent = text || "";
    el.hidden = !text;
  }

  function formError(text) {
    $("form-error").textContent = text || "";
  }

  // ---------------------------------------------------------------- key

  function setKeyState(text, ok) {
    const el = $("key-state");
    el.textContent = text;
    el.className = "key-state " + (ok === true ? "ok" : ok === false ? "bad" : "");
  }

  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem(KEY_STORE, state.key);
    connect();
  });

  async function connect() {
    if (!state.key) {
      setKeyState("enter your API key", null);
      return;
    }
    setKeyState("connecting…", null);
    try {
      await loadModels();
      setKeyState("connected", true);
      banner("");
      refreshTasks();
      refreshQueue();
    } catch (err) {
      setKeyState(err.status === 403 ? "key not accepted" : "cannot connect", false);
      banner(err.status === 403 ? "The server does not know this API key." : `Cannot reach the API: ${err.message}`);
    }
  }

  // ---------------------------------------------------------------- models

  async function loadModels() {
    const found = { checkpoint: [], vae: [], lora: [], textualinversion: [], controlnet: [], ipadapter: [], upscaler: [] };
    let cursor = "";
    for (let page = 0; page < 50; page++) {
      const q = new URLSearchParams({ "filter.visibility": "public", "pagination.limit": "100" });
      if (cursor) q.set("pagination.cursor", cursor);
      const data = await api("GET", `/v3/model?${q}`);
      for (const m of data.models) (found[m.type.name] ||= []).push(m);
      cursor = data.pagination.next_cursor;
      if (!cursor) break;
    }
    state.models = found;
    const keep = $("model_name").value;
    fillSelect($("model_name"), found.checkpoint, null, keep);
    fillSelect($("up-model"), found.upscaler, null);
    const hiresUpscaler = $("hires-upscaler").value;
    $("hires-upscaler").replaceChildren(new Option("Latent", "Latent"));
    for (const m of found.upscaler) $("hires-upscaler").append(new Option(m.name, m.sd_name));
    if ([...$("hires-upscaler").options].some((o) => o.value === hiresUpscaler)) $("hires-upscaler").value = hiresUpscaler;
    onCheckpointChange();
  }

  function currentCheckpoint() {
    return state.models.checkpoint.find((m) => m.sd_name === $("model_name").value) || null;
  }

  function compatible(kind) {
    const ckpt = currentCheckpoint();
    return (state.models[kind] || []).filter((m) => !ckpt || m.is_sdxl === ckpt.is_sdxl);
  }

  function fillSelect(select, models, emptyLabel, keep) {
    const previous = keep !== undefined ? keep : select.value;
    select.replaceChildren();
    if (emptyLabel !== null) select.append(new Option(emptyLabel, ""));
    for (const m of models) {
      const label = m.name + (m.base_model ? `  ·  ${m.base_model}` : "");
      select.append(new Option(label, m.sd_name));
    }
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  }

  function onCheckpointChange() {
    fillSelect($("sd_vae"), compatible("vae"), "Automatic");
    fillSelect($("cn-model"), compatible("controlnet"), null);
    fillSelect($("ip-model"), compatible("ipadapter"), null);
    for (const row of document.querySelectorAll("#lora-rows .row-model")) fillSelect(row, compatible("lora"), null);
    for (const row of document.querySelectorAll("#embedding-rows .row-model")) {
      fillSelect(row, compatible("textualinversion"), null);
    }
    $("lora-add").disabled = compatible("lora").length === 0;
    $("embedding-add").disabled = compatible("textualinversion").length === 0;
    $("cn-enabled").disabled = compatible("controlnet").length === 0;
    $("ip-enabled").disabled = compatible("ipadapter").length === 0;
  }
  $("model_name").addEventListener("change", onCheckpointChange);

  // ---------------------------------------------------------------- task type: img2img, txt2img, inpainting or upscale

  const MODES = {
    img2img: { path: "/v3/async/img2img", submit: "Generate", image: "Init image" },
    txt2img: { path: "/v3/async/txt2img", submit: "Generate", image: "Init image" },
    inpainting: { path: "/v3/async/inpainting", submit: "Inpaint", image: "Init image" },
    upscale: { path: "/v3/async/upscale", submit: "Upscale", image: "Image" },
  };

  function setMode(mode) {
    state.mode = mode;
    for (const tab of document.querySelectorAll("#modes .mode")) {
      tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
    }
    for (const el of document.querySelectorAll("[data-modes]")) el.hidden = !el.dataset.modes.split(" ").includes(mode);
    $("submit").textContent = MODES[mode].submit;
    $("init-title").textContent = MODES[mode].image;
    formError("");
    showUpscaleSize();
    if (window.UnderpaintInpaint) window.UnderpaintInpaint.modeChanged(mode === "inpainting");
  }
  for (const tab of document.querySelectorAll("#modes .mode")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  $("hires-enabled").addEventListener("change", () => { $("hires-fields").hidden = !$("hires-enabled").checked; });

  // A1111's Extras size: each side times the scale, floored to a multiple of 8 (what the server returns).
  function showUpscaleSize() {
    const scale = Number($("up-scale").value);
    $("up-size").textContent = state.init && scale > 0
      ? `${state.init.width}×${state.init.height} → ${Math.floor(state.init.width * scale / 8) * 8}×${Math.floor(state.init.height * scale / 8) * 8}`
      : "";
  }
  $("up-scale").addEventListener("input", showUpscaleSize);

  // ---------------------------------------------------------------- vocabularies (rendered in by the server)

  for (const name of VOCAB.samplers) $("sampler_name").append(new Option(name, name));
  $("cn-preprocessor").append(new Option("none (the image is the control map)", "none"));
  for (const name of VOCAB.preprocessors) $("cn-preprocessor").append(new Option(name, name));
  $("cn-preprocessor").value = VOCAB.preprocessors.includes("canny") ? "canny" : "none";

  // ---------------------------------------------------------------- adapters

  function addRow(kind, template, container, model, strength) {
    const row = $(template).content.firstElementChild.cloneNode(true);
    fillSelect(row.querySelector(".row-model"), compatible(kind), null);
    if (model) row.querySelector(".row-model").value = model;
    const s = row.querySelector(".row-strength");
    if (s && strength !== undefined) s.value = strength;
    row.querySelector(".row-remove").addEventListener("click", () => row.remove());
    $(container).append(row);
    $("adapters").open = true;
  }
  $("lora-add").addEventListener("click", () => addRow("lora", "lora-template", "lora-rows"));
  $("embedding-add").addEventListener("click", () => addRow("textualinversion", "embedding-template", "embedding-rows"));
  $("cn-enabled").addEventListener("change", () => { $("cn-fields").hidden = !$("cn-enabled").checked; });
  $("ip-enabled").addEventListener("change", () => { $("ip-fields").hidden = !$("ip-enabled").checked; });

  // ---------------------------------------------------------------- init image: drop, file, paste

  function readImage(file) {
    return new Promise((resolve, reject) => {
      if (!file || !/^image\/(png|jpeg|webp)$/.test(file.type)) {
        reject(new Error("choose a PNG, JPEG or WebP image"));
        return;
      }
      const reader = new FileReader();
      reader.onerror = () => reject(new Error("could not read the file"));
      reader.onload = () => {
        const url = reader.result;
        const img = new Image();
        img.onload = () => resolve({
          url, b64: url.slice(url.indexOf(",") + 1), width: img.naturalWidth, height: img.naturalHeight,
          name: file.name || "pasted image",
        });
        img.onerror = () => reject(new Error("this file is not an image the browser can read"));
        img.src = url;
      };
      reader.readAsDataURL(file);
    });
  }

  async function setInit(file) {
    try {
      const image = await readImage(file);
      state.init = image;
      $("init-preview").src = image.url;
      $("init-preview").hidden = false;
      $("drop-hint").hidden = true;
      $("init-info").textContent = `${image.name} · ${image.width}×${image.height}`;
      $("init-size").disabled = false;
      $("init-clear").disabled = false;
      if (window.UnderpaintInpaint) window.UnderpaintInpaint.attach(image);
      showUpscaleSize();
      formError("");
    } catch (err) {
      formError(err.message);
    }
  }

  const drop = $("dropzone");
  drop.addEventListener("click", () => $("init-file").click());
  drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("init-file").click(); });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer.files.length) setInit(ev.dataTransfer.files[0]);
  });
  $("init-file").addEventListener("change", () => { if ($("init-file").files.length) setInit($("init-file").files[0]); });
  document.addEventListener("paste", (ev) => {
    const item = [...(ev.clipboardData ? ev.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) {
      ev.preventDefault();
      setInit(item.getAsFile());
    }
  });
  $("init-clear").addEventListener("click", () => {
    state.init = null;
    $("init-preview").hidden = true;
    $("init-preview").removeAttribute("src");
    $("drop-hint").hidden = false;
    $("init-info").textContent = "";
    $("init-file").value = "";
    $("init-size").disabled = true;
    $("init-clear").disabled = true;
    if (window.UnderpaintInpaint) window.UnderpaintInpaint.attach(null);
    showUpscaleSize();
  });
  $("init-size").addEventListener("click", () => {
    if (!state.init) return;
    const fit = (v) => Math.min(2048, Math.max(128, Math.round(v / 8) * 8));
    $("width").value = fit(state.init.width);
    $("height").value = fit(state.init.height);
  });
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });

  // ---------------------------------------------------------------- submit

  const num = (id) => Number($(id).value);

  async function fileB64(input) {
    if (!input.files.length) return null;
    return (await readImage(input.files[0])).b64;
  }

  function buildUpscaleRequest() {
    if (!state.init) throw new Error("add the image to upscale first (drop, paste or choose a file)");
    if (!$("up-model").value) throw new Error("no upscaler: put one in the server's models/upscaler folder");
    const req = { model_name: $("up-model").value, image_base64: state.init.b64, scale_factor: num("up-scale") };
    return { extra: { response_image_type: $("up-output").value }, request: req };
  }

  // An adapter's own image, else the init image (image to image only).
  async function adapterImage(input, what) {
    const own = await fileB64(input);
    if (own) return own;
    if ((state.mode === "img2img" || state.mode === "inpainting") && state.init) return state.init.b64;
    throw new Error(`choose the ${what} image (text to image has no init image to fall back on)`);
  }

  async function buildRequest() {
    if (state.mode === "upscale") return buildUpscaleRequest();
    const text = state.mode === "txt2img";
    if (!text && !state.init) throw new Error("add an init image first (drop, paste or choose a file)");
    if (!$("model_name").value) throw new Error("no checkpoint: put one in the server's models/checkpoint folder");
    if (!$("prompt").value.trim()) throw new Error("write a prompt");
    const req = {
      model_name: $("model_name").value,
      prompt: $("prompt").value,
      negative_prompt: $("negative_prompt").value,
      width: num("width"),
      height: num("height"),
      image_num: num("image_num"),
      steps: num("steps"),
      guidance_scale: num("guidance_scale"),
      sampler_name: $("sampler_name").value,
      seed: num("seed"),
      clip_skip: num("clip_skip"),
    };
    if (text) {
      if ($("hires-enabled").checked) {
        req.hires_fix = {
          target_width: num("hires-width"),
          target_height: num("hires-height"),
          strength: num("hires-strength"),
          upscaler: $("hires-upscaler").value,
        };
      }
    } else {
      req.image_base64 = state.init.b64;
      req.strength = num("strength");
    }
    if ($("sd_vae").value) req.sd_vae = $("sd_vae").value;
    req.loras = [...document.querySelectorAll("#lora-rows .adapter-row")]
      .filter((r) => r.querySelector(".row-model").value)
      .map((r) => ({ model_name: r.querySelector(".row-model").value, strength: Number(r.querySelector(".row-strength").value) }));
    req.embeddings = [...document.querySelectorAll("#embedding-rows .adapter-row")]
      .filter((r) => r.querySelector(".row-model").value)
      .map((r) => ({ model_name: r.querySelector(".row-model").value }));
    if ($("cn-enabled").checked && $("cn-model").value) {
      req.controlnet = {
        units: [{
          model_name: $("cn-model").value,
          image_base64: await adapterImage($("cn-image"), "ControlNet control"),
          preprocessor: $("cn-preprocessor").value,
          strength: num("cn-strength"),
          guidance_start: num("cn-start"),
          guidance_end: num("cn-end"),
        }],
      };
    }
    if ($("ip-enabled").checked && $("ip-model").value) {
      req.ip_adapters = [{
        model_name: $("ip-model").value,
        image_base64: await adapterImage($("ip-image"), "IP-Adapter reference"),
        strength: num("ip-strength"),
      }];
    }
    if (state.mode === "inpainting") {
      // Inpainting has no width/height: the output keeps the init image's size.
      delete req.width;
      delete req.height;
      Object.assign(req, window.UnderpaintInpaint.fields());
    }
    return { extra: { response_image_type: $("response_image_type").value }, request: req };
  }

  // What the page remembers of a submit (no images): "reuse settings" and the infotext fallback use it.
  function remember(taskId, body) {
    const r = { ...body.request };
    delete r.image_base64;
    delete r.mask_image_base64;
    if (r.controlnet) r.controlnet = { units: r.controlnet.units.map(({ image_base64, ...u }) => u) };
    if (r.ip_adapters) r.ip_adapters = r.ip_adapters.map(({ image_base64, ...a }) => a);
    try {
      localStorage.setItem(PARAMS_STORE + taskId, JSON.stringify({ mode: state.mode, request: r, extra: body.extra }));
    } catch (_) { /* storage full: reuse falls back to the infotext */ }
  }

  function recalled(taskId) {
    try { return JSON.parse(localStorage.getItem(PARAMS_STORE + taskId) || "null"); } catch (_) { return null; }
  }

  $("job-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    formError("");
    if (!state.key) {
      formError("enter your API key at the top first");
      $("api-key").focus();
      return;
    }
    const button = $("submit");
    button.disabled = true; // with a fresh Idempotency-Key per click, a double-click cannot make two tasks
    try {
      const body = await buildRequest();
      const key = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
      const { task_id: taskId } = await api("POST", MODES[state.mode].path, body, { "Idempotency-Key": key });
      remember(taskId, body);
      track(taskId);
      refreshTasks();
      refreshQueue();
    } catch (err) {
      formError(err.message);
    } finally {
      button.disabled = false;
    }
  });

  // ---------------------------------------------------------------- jobs: progress, eta, queue position, cancel

  function track(taskId) {
    if (state.jobs.has(taskId)) return;
    const el = $("job-template").content.firstElementChild.cloneNode(true);
    el.dataset.taskId = taskId;
    el.querySelector(".job-id").textContent = taskId;
    const cancel = el.querySelector(".job-cancel");
    cancel.hidden = !state.cancelSupported;
    cancel.addEventListener("click", () => cancelTask(taskId, cancel));
    $("jobs").prepend(el);
    $("jobs-empty").hidden = true;
    const job = { el, timer: 0 };
    state.jobs.set(taskId, job);
    poll(taskId);
  }

  async function poll(taskId) {
    const job = state.jobs.get(taskId);
    if (!job) return;
    try {
      const data = await api("GET", `/v3/async/task-result?task_id=${encodeURIComponent(taskId)}`);
      renderJob(job.el, data);
      if (TERMINAL.has(data.task.status)) {
        finishJob(taskId, data);
        return;
      }
    } catch (err) {
      job.el.querySelector(".job-detail").textContent = err.message;
      if (err.status === 404 || err.status === 403) return;
    }
    job.timer = setTimeout(() => poll(taskId), POLL_MS);
  }

  function renderJob(el, data) {
    const t = data.task;
    el.dataset.status = t.status;
    const badge = el.querySelector(".badge");
    badge.textContent = STATUS_LABEL[t.status] || t.status;
    badge.className = "badge " + t.status;
    const pct = t.status === "TASK_STATUS_SUCCEED" ? 100 : t.progress_percent;
    el.querySelector(".bar").style.width = `${pct}%`;
    el.querySelector(".progress").setAttribute("aria-valuenow", String(pct));
    let detail = "";
    if (t.status === "TASK_STATUS_QUEUED") {
      detail = t.queue_position ? `#${t.queue_position} in the queue` : "waiting for a worker";
      if (t.eta) detail += ` · about ${formatSeconds(t.eta)}`;
    } else if (t.status === "TASK_STATUS_PROCESSING") {
      detail = `${t.progress_percent}%` + (t.eta ? ` · ${formatSeconds(t.eta)} left` : "");
    } else if (t.status === "TASK_STATUS_SUCCEED") {
      const secs = (data.extra.debug_info.complete_time_ms - data.extra.debug_info.submit_time_ms) / 1000;
      detail = `${data.images.length} image${data.images.length === 1 ? "" : "s"} in ${secs.toFixed(1)} s`;
    } else {
      detail = t.reason || "failed";
    }
    el.querySelector(".job-detail").textContent = detail;
  }

  function finishJob(taskId, data) {
    const job = state.jobs.get(taskId);
    if (job) {
      job.el.querySelector(".job-cancel").hidden = true;
      clearTimeout(job.timer);
    }
    if (data.task.status === "TASK_STATUS_SUCCEED") showImages(taskId, data);
    refreshTasks();
    refreshQueue();
  }

  async function cancelTask(taskId, button) {
    button.disabled = true;
    try {
      await api("POST", "/v3/async/task-cancel", { task_id: taskId });
    } catch (err) {
      const job = state.jobs.get(taskId);
      if (job) job.el.querySelector(".job-detail").textContent = err.message;
      button.disabled = false;
    }
  }

  function formatSeconds(s) {
    return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
  }

  // ---------------------------------------------------------------- gallery and infotext

  function showImages(taskId, data) {
    if (state.shown.has(taskId)) return;
    state.shown.add(taskId);
    const seed = Number(data.extra.seed);
    const figs = []; // in seed order; the newest task's images go first in the gallery, as one run
    data.images.forEach((image, i) => {
      const fig = $("image-template").content.firstElementChild.cloneNode(true);
      fig.dataset.taskId = taskId;
      fig.querySelector("img").src = image.image_url;
      fig.querySelector(".shot-open").href = image.image_url;
      const dl = fig.querySelector(".shot-download");
      dl.href = image.image_url;
      dl.download = `${taskId}-${i}.${image.image_type === "jpeg" ? "jpg" : image.image_type}`;
      const imageSeed = (seed + i) % 2 ** 32; // image i of a task uses seed + i, as A1111 does
      fig.querySelector(".shot-seed").textContent = String(imageSeed);
      fig.dataset.seed = String(imageSeed);
      figs.push(fig);
      const info = infotextFor(taskId, image, imageSeed).then((found) => {
        fig.querySelector(".shot-info").textContent = found.text;
        if (found.seed !== null) {
          fig.dataset.seed = String(found.seed);
          fig.querySelector(".shot-seed").textContent = String(found.seed);
        }
        fig.dataset.info = found.parsed ? "png" : "recorded";
        return found;
      });
      if ((recalled(taskId) || {}).mode === "upscale") {
        for (const el of fig.querySelectorAll(".shot-reuse-seed, .shot-reuse")) el.hidden = true;
        fig.querySelector(".shot-seed").parentElement.textContent = `Upscaled ${image.image_type}`;
      }
      fig.querySelector(".shot-reuse-seed").addEventListener("click", () => { $("seed").value = fig.dataset.seed; });
      fig.querySelector(".shot-reuse").addEventListener("click", async () => {
        reuseSettings(taskId, await info, Number(fig.dataset.seed));
      });
    });
    $("gallery").prepend(...figs);
    $("gallery-empty").hidden = true;
  }

  $("gallery-clear").addEventListener("click", () => {
    $("gallery").replaceChildren();
    state.shown.clear();
    $("gallery-empty").hidden = false;
  });

  // The A1111 "parameters" text: from the PNG's tEXt/iTXt chunk; for JPEG/WebP (EXIF) or an unreadable image,
  // rebuilt from what this browser submitted.
  async function infotextFor(taskId, image, seed) {
    let text = null;
    if (image.image_type === "png") {
      try {
        const res = await fetch(image.image_url);
        if (res.ok) text = pngText(new Uint8Array(await res.arrayBuffer()), "parameters");
      } catch (_) { /* cross-origin storage without CORS: fall back */ }
    }
    const parsed = text ? parseInfotext(text) : null;
    if (!text) {
      const p = recalled(taskId);
      text = p ? describe(p.request, seed) : "(parameters not available for this image)";
    }
    return { text, parsed, seed: parsed && parsed.Seed ? Number(parsed.Seed) : null };
  }

  function pngText(bytes, keyword) {
    const sig = [137, 80, 78, 71, 13, 10, 26, 10];
    if (bytes.length < 8 || sig.some((b, i) => bytes[i] !== b)) return null;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const latin1 = new TextDecoder("latin1");
    const utf8 = new TextDecoder("utf-8");
    let off = 8;
    while (off + 12 <= bytes.length) {
      const len = view.getUint32(off);
      const type = latin1.decode(bytes.subarray(off + 4, off + 8));
      const data = bytes.subarray(off + 8, off + 8 + len);
      if (type === "tEXt" || type === "iTXt") {
        const nul = data.indexOf(0);
        if (nul > 0 && latin1.decode(data.subarray(0, nul)) === keyword) {
          if (type === "tEXt") return latin1.decode(data.subarray(nul + 1));
          // iTXt: keyword\0 compression-flag compression-method language\0 translated\0 text
          if (data[nul + 1] !== 0) return null; // compressed iTXt: not written by Underpaint
          let p = nul + 3;
          p = data.indexOf(0, p) + 1;
          p = data.indexOf(0, p) + 1;
          return utf8.decode(data.subarray(p));
        }
      }
      if (type === "IEND") break;
      off += 12 + len;
    }
    return null;
  }

  // "prompt\nNegative prompt: ...\nSteps: 20, Sampler: <name>, ..." -> {prompt, negative, Steps, Sampler, ...}
  function parseInfotext(text) {
    const lines = text.split("\n");
    const last = lines.pop() || "";
    const out = { prompt: "", negative: "" };
    const neg = lines.findIndex((l) => l.startsWith("Negative prompt: "));
    if (neg >= 0) {
      out.prompt = lines.slice(0, neg).join("\n");
      out.negative = lines.slice(neg).join("\n").slice("Negative prompt: ".length);
    } else {
      out.prompt = lines.join("\n");
    }
    const re = /\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;
    let m;
    while ((m = re.exec(last)) !== null && m[0]) {
      let v = m[2].trim();
      if (v.startsWith('"')) { try { v = JSON.parse(v); } catch (_) { /* keep quoted */ } }
      out[m[1].trim()] = v;
    }
    return out;
  }

  function describe(r, seed) {
    const lines = [r.prompt];
    if (r.negative_prompt) lines.push(`Negative prompt: ${r.negative_prompt}`);
    const params = [
      `Steps: ${r.steps}`, `Sampler: ${r.sampler_name}`, `CFG scale: ${r.guidance_scale}`, `Seed: ${seed}`,
      `Size: ${r.width}x${r.height}`, `Model: ${r.model_name}`,
    ];
    if (r.strength !== undefined) params.push(`Denoising strength: ${r.strength}`);
    if (r.hires_fix) {
      params.push(`Denoising strength: ${r.hires_fix.strength}`,
        `Hires resize: ${r.hires_fix.target_width}x${r.hires_fix.target_height}`, `Hires upscaler: ${r.hires_fix.upscaler}`);
    }
    lines.push(params.join(", "));
    return lines.join("\n");
  }

  function reuseSettings(taskId, info, seed) {
    const p = recalled(taskId);
    if (p) {
      const r = p.request;
      if (p.mode === "img2img" || p.mode === "txt2img" || p.mode === "inpainting") setMode(p.mode);
      $("hires-enabled").checked = Boolean(r.hires_fix);
      $("hires-fields").hidden = !r.hires_fix;
      if (r.hires_fix) {
        $("hires-width").value = r.hires_fix.target_width;
        $("hires-height").value = r.hires_fix.target_height;
        $("hires-strength").value = r.hires_fix.strength;
        $("hires-upscaler").value = r.hires_fix.upscaler;
      }
      for (const id of ["prompt", "negative_prompt", "width", "height", "image_num", "steps", "guidance_scale",
        "strength", "clip_skip"]) {
        if (r[id] !== undefined) $(id).value = r[id];
      }
      if (r.sampler_name) $("sampler_name").value = r.sampler_name;
      if (r.model_name) { $("model_name").value = r.model_name; onCheckpointChange(); }
      $("sd_vae").value = r.sd_vae || "";
      $("lora-rows").replaceChildren();
      for (const l of r.loras || []) addRow("lora", "lora-template", "lora-rows", l.model_name, l.strength);
      $("embedding-rows").replaceChildren();
      for (const e of r.embeddings || []) addRow("textualinversion", "embedding-template", "embedding-rows", e.model_name);
      const unit = r.controlnet && r.controlnet.units[0];
      $("cn-enabled").checked = !!unit;
      $("cn-fields").hidden = !unit;
      if (unit) {
        $("cn-model").value = unit.model_name;
        $("cn-preprocessor").value = unit.preprocessor || "none";
        $("cn-strength").value = unit.strength;
        $("cn-start").value = unit.guidance_start;
        $("cn-end").value = unit.guidance_end;
      }
      const ip = r.ip_adapters && r.ip_adapters[0];
      $("ip-enabled").checked = !!ip;
      $("ip-fields").hidden = !ip;
      if (ip) { $("ip-model").value = ip.model_name; $("ip-strength").value = ip.strength; }
      if (p.extra && p.extra.response_image_type) $("response_image_type").value = p.extra.response_image_type;
    } else if (info.parsed) {
      const q = info.parsed;
      $("prompt").value = q.prompt.replace(/\s*<lora:[^>]*>/g, "");
      $("negative_prompt").value = q.negative;
      if (q.Steps) $("steps").value = q.Steps;
      if (q.Sampler) $("sampler_name").value = q.Sampler;
      if (q["CFG scale"]) $("guidance_scale").value = q["CFG scale"];
      if (q["Denoising strength"]) $("strength").value = q["Denoising strength"];
      if (q.Size) { const [w, h] = q.Size.split("x"); $("width").value = w; $("height").value = h; }
      if (q.Model) { $("model_name").value = q.Model; onCheckpointChange(); }
    }
    $("seed").value = seed;
    window.scrollTo({ top: 0, behavior: "smooth" });
  }

  // ---------------------------------------------------------------- recent tasks

  async function refreshTasks() {
    if (!state.key) return;
    let data;
    try { data = await api("GET", "/v3/async/tasks?limit=20"); } catch (_) { return; }
    const body = $("tasks");
    body.replaceChildren();
    for (const t of data.tasks) {
      const tr = document.createElement("tr");
      tr.dataset.taskId = t.task_id;
      const id = document.createElement("td");
      id.innerHTML = "<code></code>";
      id.firstChild.textContent = t.task_id.slice(0, 8);
      id.title = t.task_id;
      const status = document.createElement("td");
      const badge = document.createElement("span");
      badge.className = "badge " + t.status;
      badge.textContent = STATUS_LABEL[t.status] + (t.status === "TASK_STATUS_PROCESSING" ? ` ${t.progress_percent}%` : "");
      if (t.reason) badge.title = t.reason;
      status.append(badge);
      const images = document.createElement("td");
      images.textContent = String(t.image_num);
      const created = document.createElement("td");
      created.textContent = new Date(t.created_time_ms).toLocaleTimeString();
      tr.append(id, status, images, created);
      tr.addEventListener("click", () => openTask(t));
      body.append(tr);
    }
    $("tasks-empty").hidden = data.tasks.length > 0;
  }
  $("tasks-refresh").addEventListener("click", refreshTasks);

  async function openTask(t) {
    if (!TERMINAL.has(t.status)) { track(t.task_id); return; }
    try {
      const data = await api("GET", `/v3/async/task-result?task_id=${encodeURIComponent(t.task_id)}`);
      if (data.task.status === "TASK_STATUS_SUCCEED") showImages(t.task_id, data);
      else track(t.task_id);
    } catch (err) {
      formError(err.message);
    }
  }

  // ---------------------------------------------------------------- queue and workers

  async function refreshQueue() {
    if (!state.key) return;
    let q;
    try { q = await api("GET", "/v3/async/queue"); } catch (_) { return; }
    $("q-queued").textContent = q.queue.queued;
    $("q-processing").textContent = q.queue.processing;
    $("q-mine-queued").textContent = q.mine.queued;
    $("q-mine-processing").textContent = q.mine.processing;
    $("q-mode").textContent = `· ${q.mode}, ${q.workers_alive} alive`;
    const list = $("workers");
    list.replaceChildren();
    if (!q.workers.length) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = "No worker known.";
      list.append(li);
    }
    for (const w of q.workers) {
      const li = document.createElement("li");
      const name = document.createElement("span");
      const dot = document.createElement("span");
      dot.className = "dot" + (w.alive ? " alive" : "");
      name.append(dot, `${w.worker_id} (${w.kind})`);
      const load = document.createElement("span");
      load.className = "muted";
      load.textContent = `${w.busy}/${w.concurrency} busy` + (w.queues.length && w.queues[0] !== "*" ? ` · ${w.queues.join(", ")}` : "");
      li.append(name, load);
      list.append(li);
    }
  }

  // ---------------------------------------------------------------- start

  async function detectExtensions() {
    try {
      const res = await fetch("/openapi.json");
      const doc = await res.json();
      state.cancelSupported = Boolean(doc.paths && doc.paths["/v3/async/task-cancel"]);
    } catch (_) {
      state.cancelSupported = false;
    }
  }

  detectExtensions().then(connect);
  setInterval(refreshQueue, 3000);
  setInterval(refreshTasks, 6000);
})();
