// Underpaint playground, inpainting mode: a mask brush over the init image (draw, erase, invert, clear, a preview
// of the server's mask blur) and Novita's inpainting fields. playground.js tells it, through
// window.UnderpaintInpaint, about the init image and the mode tab, and asks it for the request's fields.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  const stage = $("mask-stage");
  // What is painted shows in red; only its alpha matters for the mask sent.
  const PAINT_RGB = [255, 59, 59];
  const PAINT = `rgb(${PAINT_RGB.join(", ")})`;
  let tool = "draw";
  let drawing = false;
  let last = null;
  let painted = false;

  // The inpainting tab is on: Novita's inpainting strength default (1) replaces the img2img value while it is.
  function modeChanged(on) {
    if (on && $("strength").dataset.img2img === undefined) {
      // Novita's inpainting default strength is 1; remember the img2img value to restore it.
      $("strength").dataset.img2img = $("strength").value;
      $("strength").value = 1;
    } else if (!on && $("strength").dataset.img2img !== undefined) {
      $("strength").value = $("strength").dataset.img2img;
      delete $("strength").dataset.img2img;
    }
    if (on) previewBlur();
  }

  // The canvas keeps the init image's own size: the mask sent is pixel for pixel the image's.
  function attach(image) {
    if (!image) {
      $("mask-base").removeAttribute("src");
      stage.hidden = true;
      $("mask-empty").hidden = false;
      return;
    }
    $("mask-base").src = image.url;
    canvas.width = image.width;
    canvas.height = image.height;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    painted = false;
    stage.hidden = false;
    $("mask-empty").hidden = true;
    previewBlur();
  }

  function scale() {
    const rect = canvas.getBoundingClientRect();
    return rect.width ? canvas.width / rect.width : 1;
  }

  function point(ev) {
    const rect = canvas.getBoundingClientRect();
    const s = scale();
    return { x: (ev.clientX - rect.left) * s, y: (ev.clientY - rect.top) * s };
  }

  function stroke(from, to) {
    ctx.save();
    ctx.globalCompositeOperation = tool === "erase" ? "destination-out" : "source-over";
    ctx.strokeStyle = PAINT;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush-size").value) * scale();
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    ctx.restore();
    if (tool === "draw") painted = true;
  }

  canvas.addEventListener("pointerdown", (ev) => {
    ev.preventDefault();
    canvas.setPointerCapture(ev.pointerId);
    drawing = true;
    last = point(ev);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!drawing) return;
    const p = point(ev);
    stroke(last, p);
    last = p;
  });
  const stop = () => { drawing = false; last = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);

  function setTool(name) {
    tool = name;
    $("tool-draw").classList.toggle("active", name === "draw");
    $("tool-erase").classList.toggle("active", name === "erase");
  }
  $("tool-draw").addEventListener("click", () => setTool("draw"));
  $("tool-erase").addEventListener("click", () => setTool("erase"));

  // Invert the painted mask itself (what is painted becomes unpainted).
  $("mask-invert").addEventListener("click", () => {
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const a = 255 - px[i + 3];
      [px[i], px[i + 1], px[i + 2]] = PAINT_RGB;
      px[i + 3] = a;
    }
    ctx.putImageData(data, 0, 0);
    painted = true;
  });
  $("mask-clear").addEventListener("click", () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    painted = false;
  });

  // The server blurs the mask with a Gaussian of sigma = mask_blur image pixels; CSS blur takes a display-pixel
  // standard deviation, so the preview scales it to the canvas's displayed size.
  function previewBlur() {
    const on = $("mask-blur-preview").checked;
    const px = Number($("mask_blur").value) / scale();
    canvas.style.filter = on && px > 0 ? `blur(${px.toFixed(2)}px)` : "";
  }
  $("mask-blur-preview").addEventListener("change", previewBlur);
  $("mask_blur").addEventListener("input", previewBlur);
  window.addEventListener("resize", previewBlur);

  $("inpainting_full_res").addEventListener("change", () => {
    $("padding-label").hidden = $("inpainting_full_res").value !== "1";
  });

  // The mask as a PNG: white where painted (the brush's alpha, so soft edges stay grey), black elsewhere.
  function maskB64() {
    const out = document.createElement("canvas");
    out.width = canvas.width;
    out.height = canvas.height;
    const octx = out.getContext("2d");
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const a = px[i + 3];
      px[i] = px[i + 1] = px[i + 2] = a;
      px[i + 3] = 255;
    }
    octx.putImageData(data, 0, 0);
    const url = out.toDataURL("image/png");
    return url.slice(url.indexOf(",") + 1);
  }

  function fields() {
    if (!painted) throw new Error("paint the area to repaint on the mask first");
    return {
      mask_image_base64: maskB64(),
      mask_blur: Number($("mask_blur").value),
      inpainting_full_res: Number($("inpainting_full_res").value),
      inpainting_full_res_padding: Number($("inpainting_full_res_padding").value),
      inpainting_mask_invert: Number($("inpainting_mask_invert").value),
      initial_noise_multiplier: Number($("initial_noise_multiplier").value),
    };
  }

  window.UnderpaintInpaint = { attach, fields, modeChanged };
})();
