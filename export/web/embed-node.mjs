#!/usr/bin/env node
// Runs a prtool export with onnxruntime-web (WASM, one thread) under Node: the page's engine and
// preprocessing, headless, for checks. PNG through pngjs, JPEG through libjpeg-turbo (WASM build,
// @cwasm/jpeg-turbo: islow DCT and fancy upsampling, as Pillow and the browsers decode).
//
//   node embed-node.mjs MODEL.onnx IMAGE... [--batch N] [--out FILE] [--dump-pixels FILE]
//
// Writes the JSON document export/cpp's prtool-embed writes. Errors: one line on stderr, exit 1.
import { createHash } from "node:crypto";
import { readFileSync, renameSync, writeFileSync } from "node:fs";

import jpeg from "@cwasm/jpeg-turbo";
import * as ort from "onnxruntime-web";
import pngjs from "pngjs";

import { createEmbedder } from "./lib/embed.js";
import { rgbaToRgb } from "./lib/preprocess.js";

function parseArgs(argv) {
  const args = { batch: 8, positional: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--batch") args.batch = Number(argv[++i]);
    else if (a === "--out") args.out = argv[++i];
    else if (a === "--dump-pixels") args.dumpPixels = argv[++i];
    else if (a.startsWith("--")) throw new Error(`unknown option ${a}`);
    else args.positional.push(a);
  }
  if (args.positional.length < 2) throw new Error("give a model and at least one image");
  if (!(args.batch >= 1)) throw new Error("--batch must be >= 1");
  return args;
}

function decode(path) {
  const bytes = readFileSync(path);
  if (bytes.subarray(0, 8).equals(Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]))) {
    const png = pngjs.PNG.sync.read(bytes);
    return rgbaToRgb(png.width, png.height, png.data);
  }
  if (bytes[0] === 0xff && bytes[1] === 0xd8) {
    const img = jpeg.decode(bytes);
    return rgbaToRgb(img.width, img.height, img.data);
  }
  throw new Error(`image ${path} is neither PNG nor JPEG`);
}

function loadManifest(modelPath) {
  const jsonPath = modelPath.replace(/\.[^./]*$/, "") + ".json";
  let manifest;
  try {
    manifest = JSON.parse(readFileSync(jsonPath, "utf8"));
  } catch (e) {
    throw new Error(`no readable manifest ${jsonPath} beside ${modelPath}: export with \`prtool export\`, which writes it`);
  }
  const bytes = readFileSync(modelPath);
  const sha = createHash("sha256").update(bytes).digest("hex");
  if (sha !== manifest.onnx_sha256) throw new Error(`manifest ${jsonPath} describes another graph (onnx_sha256): re-export`);
  return { manifest, jsonPath, bytes };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const [modelPath, ...imagePaths] = args.positional;
  const { manifest, jsonPath, bytes } = loadManifest(modelPath);
  ort.env.wasm.numThreads = 1;
  const embedder = await createEmbedder(ort, new Uint8Array(bytes), manifest);
  const images = [], pixels = [];
  let preprocessMs = 0, inferMs = 0;
  for (let start = 0; start < imagePaths.length; start += args.batch) {
    const paths = imagePaths.slice(start, start + args.batch);
    const run = await embedder.embed(paths.map(decode));
    run.entries.forEach((e, i) => images.push({ path: paths[i], ...e }));
    pixels.push(Buffer.from(run.pixels.buffer));
    preprocessMs += run.preprocessMs;
    inferMs += run.inferMs;
  }
  if (args.dumpPixels) writeFileSync(args.dumpPixels, Buffer.concat(pixels));
  const version = ort.env.versions?.web ?? "unknown";
  const doc = { model: modelPath, manifest: jsonPath, backend: `onnxruntime-web ${version} (node ${process.version}, wasm)`,
                onnx_sha256: manifest.onnx_sha256, batch: args.batch,
                timing_ms: { load: embedder.loadMs, preprocess: preprocessMs, infer: inferMs }, images };
  const text = JSON.stringify(doc) + "\n";
  if (!args.out) process.stdout.write(text);
  else {
    writeFileSync(args.out + ".tmp", text);
    renameSync(args.out + ".tmp", args.out);
  }
}

main().catch((e) => {
  process.stderr.write(`embed-node: error: ${e.message}\n`);
  process.exit(1);
});
