// The page: loads an export and its manifest (?model=URL, default model/model.onnx), embeds a
// dropped or chosen image with onnxruntime-web (WASM), shows the top-5 classes (exports with a
// classifier head), the patches the pruned encoder kept, and the run's latency.
// ?image=URL embeds that image on load; ?check=URL (a JSON {"images": [...], "batch": N}) embeds a
// list and POSTs the document embed-node.mjs writes to ?post=URL (headless checks).
import * as ort from "onnxruntime-web";

import { createEmbedder, topK } from "./lib/embed.js";
import { rgbaToRgb } from "./lib/preprocess.js";

const params = new URLSearchParams(location.search);
const modelUrl = new URL(params.get("model") || "model/model.onnx", location.href).href;
const $ = (id) => document.getElementById(id);
ort.env.wasm.numThreads = 1;  // more threads need cross-origin isolation (COOP/COEP headers)
ort.env.wasm.wasmPaths = new URL("node_modules/onnxruntime-web/dist/", location.href).href;

async function sha256Hex(bytes) {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function loadModel() {
  const manifestUrl = modelUrl.replace(/\.[^./]*$/, "") + ".json";
  const [modelResp, manifestResp] = await Promise.all([fetch(modelUrl), fetch(manifestUrl)]);
  if (!modelResp.ok || !manifestResp.ok) throw new Error(`cannot fetch ${modelUrl} and its manifest ${manifestUrl}`);
  const bytes = new Uint8Array(await modelResp.arrayBuffer());
  const manifest = await manifestResp.json();
  if ((await sha256Hex(bytes)) !== manifest.onnx_sha256) throw new Error(`${manifestUrl} describes another graph (onnx_sha256)`);
  return { manifest, embedder: await createEmbedder(ort, bytes, manifest) };
}

// Decoded by the browser, no colour conversion, alpha dropped: RGB {width, height, data}.
async function decode(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const ctx = new OffscreenCanvas(bitmap.width, bitmap.height).getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  return rgbaToRgb(bitmap.width, bitmap.height, ctx.getImageData(0, 0, bitmap.width, bitmap.height).data);
}

function describeModel(m) {
  const s = m.schedule;
  const pruning = m.pruned ? `pruned ${s.string} (keeps ${s.final_keep}/${s.num_patches} patches, scorer ${m.scorer})`
                           : `unpruned (${s.num_patches} patches)`;
  const head = m.classnames ? `, classifier over ${m.classnames.length} classes` : ", no classifier head";
  return `${m.source.model} (${m.source.pretrained}), ${m.preprocess.image_size.join("x")} px, ${pruning}${head}`;
}

// The cropped image the model saw, scaled up, with the pruned patches dimmed.
function draw(cropped, kept, numPatches) {
  const canvas = $("view"), ctx = canvas.getContext("2d");
  const rgba = new ImageData(cropped.width, cropped.height);
  for (let i = 0, j = 0; i < cropped.data.length; i += 3, j += 4) {
    rgba.data.set(cropped.data.subarray(i, i + 3), j);
    rgba.data[j + 3] = 255;
  }
  const tmp = new OffscreenCanvas(cropped.width, cropped.height);
  tmp.getContext("2d").putImageData(rgba, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
  if (!kept) return;
  const gw = Math.round(Math.sqrt((numPatches * cropped.width) / cropped.height)), gh = numPatches / gw;
  const pw = canvas.width / gw, ph = canvas.height / gh, keep = new Set(kept);
  ctx.fillStyle = "rgba(10, 14, 24, 0.62)";
  for (let p = 0; p < numPatches; p++) {
    if (!keep.has(p)) ctx.fillRect((p % gw) * pw, Math.floor(p / gw) * ph, pw, ph);
  }
}

function show(model, run, label) {
  const entry = run.entries[0], m = model.manifest;
  draw(run.cropped[0], entry.kept_patch_indices, m.schedule.num_patches);
  const list = $("top5");
  list.replaceChildren();
  if (entry.logits) {
    const max = Math.max(...entry.logits), exp = entry.logits.map((v) => Math.exp(v - max));
    const total = exp.reduce((a, b) => a + b, 0);
    for (const t of topK(entry.logits, m.classnames)) {
      const li = document.createElement("li"), p = exp[t.index] / total;
      li.textContent = `${t.class} ${(100 * p).toFixed(1)}%`;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.max(1, 160 * p)}px`;
      li.append(bar);
      list.append(li);
    }
  } else {
    list.innerHTML = '<li class="muted">this export has no classifier head (export with --classifier)</li>';
  }
  $("kept").textContent = entry.kept_patch_indices
    ? `${label}: kept ${entry.kept_patch_indices.length} of ${m.schedule.num_patches} patches after the last stage (dimmed: pruned)`
    : `${label}: every patch kept (export with --with-kept-indices to see the kept patches)`;
  $("latency").textContent = `inference ${run.inferMs.toFixed(1)} ms (first run ${run.firstInferMs.toFixed(1)} ms), ` +
    `preprocess ${run.preprocessMs.toFixed(1)} ms; onnxruntime-web ${ort.env.versions?.web ?? ""}, WASM, 1 thread; ` +
    `model load ${model.embedder.loadMs.toFixed(0)} ms`;
  return { top5: entry.logits ? topK(entry.logits, m.classnames).map((t) => t.class) : null,
           kept: entry.kept_patch_indices?.length ?? null, latency: $("latency").textContent };
}

// Embeds one image twice: the first run pays the WASM warm-up, the second is the latency shown.
async function embedBlob(model, blob, label) {
  const image = await decode(blob);
  const first = await model.embedder.embed([image]);
  const warm = await model.embedder.embed([image]);
  return show(model, { ...warm, firstInferMs: first.inferMs }, label);
}

async function runCheck(model, listUrl, postUrl) {
  const list = await (await fetch(listUrl)).json();
  const batch = list.batch || 8, images = [];
  let preprocessMs = 0, inferMs = 0;
  for (let start = 0; start < list.images.length; start += batch) {
    const urls = list.images.slice(start, start + batch);
    const decoded = await Promise.all(urls.map(async (u) => decode(await (await fetch(u)).blob())));
    const run = await model.embedder.embed(decoded);
    run.entries.forEach((e, i) => images.push({ path: urls[i], ...e }));
    preprocessMs += run.preprocessMs;
    inferMs += run.inferMs;
  }
  const doc = { model: modelUrl, backend: `onnxruntime-web ${ort.env.versions?.web} (${navigator.userAgent}, wasm)`,
                onnx_sha256: model.manifest.onnx_sha256, batch,
                timing_ms: { load: model.embedder.loadMs, preprocess: preprocessMs, infer: inferMs }, images };
  await fetch(postUrl, { method: "POST", body: JSON.stringify(doc), headers: { "Content-Type": "application/json" } });
}

function wireDrop(model) {
  const drop = $("drop");
  const take = (file) => file && embedBlob(model, file, file.name).catch(fail);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); take(e.dataTransfer.files[0]); });
  $("file").addEventListener("change", (e) => take(e.target.files[0]));
}

function fail(e) {
  $("status").textContent = `error: ${e.message}`;
  const post = params.get("post");
  if (post) fetch(post, { method: "POST", body: JSON.stringify({ error: e.message }) });
}

async function main() {
  const model = await loadModel();
  $("model-info").textContent = describeModel(model.manifest);
  wireDrop(model);
  if (params.get("check")) await runCheck(model, params.get("check"), params.get("post") || "results");
  const image = params.get("image");
  const shown = image ? await embedBlob(model, await (await fetch(image)).blob(), decodeURIComponent(image.split("/").pop())) : {};
  document.title = "prtool: ready";
  const post = params.get("post");
  if (post && !params.get("check")) await fetch(post, { method: "POST", body: JSON.stringify({ ready: true, ...shown }) });
}

main().catch(fail);
