// An export run with onnxruntime-web: RGB images in, one JSON entry per image out (the same
// document export/cpp's prtool-embed writes). `ort` is passed in: the browser and Node load
// onnxruntime-web differently.
import { resizeAndCrop, toPixelValues } from "./preprocess.js";

// The k largest logits, highest first (ties: lower class index first), with class names.
export function topK(logits, classnames, k = 5) {
  const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a] || a - b);
  return order.slice(0, k).map((index) => ({ index, class: classnames?.[index] ?? String(index), logit: logits[index] }));
}

function imageEntry(session, results, i) {
  const entry = {};
  for (const name of session.outputNames) {
    const t = results[name];
    const row = t.dims.length > 1 ? t.dims[1] : 1;
    const values = Array.from(t.data.subarray(i * row, (i + 1) * row), Number);
    entry[name] = values;
    if (name === "logits") entry.top5 = topK(values, session.classnames);
  }
  return entry;
}

// session: onnxruntime-web session over the export; manifest: its model.json.
export async function createEmbedder(ort, model, manifest) {
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
  session.classnames = manifest.classnames;
  const pre = manifest.preprocess;
  const [h, w] = pre.image_size;
  return {
    loadMs: performance.now() - t0,
    outputNames: session.outputNames,
    // images: [{width, height, data: RGB Uint8Array}]; returns {entries, pixels, preprocessMs, inferMs}.
    async embed(images) {
      const t1 = performance.now();
      const pixels = new Float32Array(images.length * 3 * h * w);
      const cropped = images.map((img, i) => {
        const c = resizeAndCrop(img, pre);
        toPixelValues(c, pre, pixels, i * 3 * h * w);
        return c;
      });
      const t2 = performance.now();
      const feeds = { pixel_values: new ort.Tensor("float32", pixels, [images.length, 3, h, w]) };
      const results = await session.run(feeds);
      const t3 = performance.now();
      const entries = images.map((img, i) => ({ ...imageEntry(session, results, i), size: [img.width, img.height] }));
      return { entries, cropped, pixels, preprocessMs: t2 - t1, inferMs: t3 - t2 };
    },
  };
}
