// Classify JPEG images with a wbc-batch ONNX model in Node.js (onnxruntime-node).
// Usage: node classify.mjs MODEL.onnx IMAGE_DIR  -> JSON {labels, predictions: [{path, label, probabilities}]}
//
// Everything the program needs comes from the model file: labels, input name and size,
// resize method. onnxruntime-node does not expose an ONNX file's custom metadata
// (onnxruntime issue #16547), so readMetadataProps() reads metadata_props from the protobuf.
import fs from "node:fs";
import path from "node:path";
import jpeg from "jpeg-js";
import ort from "onnxruntime-node";

function readVarint(buf, pos) {
  let result = 0n, shift = 0n;
  for (;;) {
    const b = buf[pos++];
    result |= BigInt(b & 0x7f) << shift;
    if (!(b & 0x80)) return [Number(result), pos];
    shift += 7n;
  }
}

// Walk a protobuf message's fields; calls fn(fieldNumber, wireType, value|[start,end]).
function fields(buf, start, end, fn) {
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const field = key >> 3, wire = key & 7;
    if (wire === 0) { let v; [v, pos] = readVarint(buf, pos); fn(field, wire, v); }
    else if (wire === 1) { pos += 8; }
    else if (wire === 5) { pos += 4; }
    else if (wire === 2) { let len; [len, pos] = readVarint(buf, pos); fn(field, wire, [pos, pos + len]); pos += len; }
    else throw new Error(`unsupported wire type ${wire}`);
  }
}

// ModelProto.metadata_props is field 14: StringStringEntryProto {key = 1, value = 2}.
export function readMetadataProps(buf) {
  const props = {};
  fields(buf, 0, buf.length, (f, w, v) => {
    if (f !== 14 || w !== 2) return;
    let key = "", value = "";
    fields(buf, v[0], v[1], (f2, w2, v2) => {
      if (w2 !== 2) return;
      const s = buf.subarray(v2[0], v2[1]).toString("utf8");
      if (f2 === 1) key = s; else if (f2 === 2) value = s;
    });
    props[key] = value;
  });
  return props;
}

// Pillow's separable resampling (antialiased bilinear: triangle filter widened by the scale),
// with its 8-bit rounding after each pass, so pixels match Python's closely.
function resamplePass(src, sw, sh, dw, horizontal) {
  const inSize = horizontal ? sw : sh, outSize = dw;
  const scale = inSize / outSize, filterscale = Math.max(scale, 1), support = filterscale;
  const outW = horizontal ? dw : sw, outH = horizontal ? sh : dw;
  const out = new Uint8Array(outW * outH * 3);
  for (let o = 0; o < outSize; o++) {
    const center = (o + 0.5) * scale;
    const xmin = Math.max(Math.floor(center - support + 0.5), 0);
    const xmax = Math.min(Math.floor(center + support + 0.5), inSize);
    const ws = [];
    let total = 0;
    for (let i = xmin; i < xmax; i++) {
      const t = Math.abs((i - center + 0.5) / filterscale);
      const w = t < 1 ? 1 - t : 0;
      ws.push(w); total += w;
    }
    for (let k = 0; k < ws.length; k++) ws[k] /= total || 1;
    const lines = horizontal ? sh : sw;
    for (let l = 0; l < lines; l++) {
      for (let c = 0; c < 3; c++) {
        let acc = 0;
        for (let k = 0; k < ws.length; k++) {
          const i = xmin + k;
          const idx = horizontal ? (l * sw + i) * 3 + c : (i * sw + l) * 3 + c;
          acc += src[idx] * ws[k];
        }
        const v = Math.min(255, Math.max(0, Math.round(acc)));
        const oi = horizontal ? (l * dw + o) * 3 + c : (o * sw + l) * 3 + c;
        out[oi] = v;
      }
    }
  }
  return out;
}

function resizeRGB(rgb, w, h, W, H) {
  const a = w === W ? rgb : resamplePass(rgb, w, h, W, true);
  return h === H ? a : resamplePass(a, W, h, H, false);
}

// preprocess.keep_aspect: fit inside W x H keeping the aspect ratio, centred on black
// (the rule of wbc_batch.inference.preprocess.fit_box).
function fitRGB(rgb, w, h, W, H) {
  const s = Math.min(W / w, H / h);
  const nw = Math.max(1, Math.min(W, Math.floor(w * s + 0.5)));
  const nh = Math.max(1, Math.min(H, Math.floor(h * s + 0.5)));
  const x0 = Math.floor((W - nw) / 2), y0 = Math.floor((H - nh) / 2);
  const small = resizeRGB(rgb, w, h, nw, nh);
  const out = new Uint8Array(W * H * 3);
  for (let y = 0; y < nh; y++) out.set(small.subarray(y * nw * 3, (y + 1) * nw * 3), ((y + y0) * W + x0) * 3);
  return out;
}

function loadRGB(file) {
  const img = jpeg.decode(fs.readFileSync(file), { useTArray: true, formatAsRGBA: true });
  const rgb = new Uint8Array(img.width * img.height * 3);
  for (let i = 0, j = 0; i < img.data.length; i += 4, j += 3) {
    rgb[j] = img.data[i]; rgb[j + 1] = img.data[i + 1]; rgb[j + 2] = img.data[i + 2];
  }
  return { rgb, width: img.width, height: img.height };
}

function listJpegs(dir) {
  const out = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
    if (e.name.startsWith(".")) continue;
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...listJpegs(p));
    else if (/\.(jpe?g)$/i.test(e.name)) out.push(p);
  }
  return out;
}

async function main() {
  const [modelPath, imageDir] = process.argv.slice(2);
  const modelBytes = fs.readFileSync(modelPath);
  const raw = readMetadataProps(modelBytes)["wbc_batch"];
  if (!raw) throw new Error(`${modelPath} carries no wbc_batch metadata`);
  const meta = JSON.parse(raw);
  const { name: inputName, height: H, width: W, layout, dtype } = meta.input;
  if (layout !== "NHWC" || dtype !== "uint8") throw new Error(`unsupported input ${layout} ${dtype}`);
  const session = await ort.InferenceSession.create(modelBytes);
  const files = listJpegs(imageDir);
  const batch = new Uint8Array(files.length * H * W * 3);
  files.forEach((f, n) => {
    const { rgb, width, height } = loadRGB(f);
    const keepAspect = meta.preprocess && meta.preprocess.keep_aspect && (width !== W || height !== H);
    batch.set(keepAspect ? fitRGB(rgb, width, height, W, H) : resizeRGB(rgb, width, height, W, H), n * H * W * 3);
  });
  const feeds = { [inputName]: new ort.Tensor("uint8", batch, [files.length, H, W, 3]) };
  const result = await session.run(feeds);
  const probs = result[meta.output.name].data;
  const C = meta.labels.length;
  const predictions = files.map((f, n) => {
    const p = Array.from(probs.slice(n * C, (n + 1) * C));
    const best = p.indexOf(Math.max(...p));
    return { path: path.relative(imageDir, f).split(path.sep).join("/"), label: meta.labels[best], probabilities: p };
  });
  process.stdout.write(JSON.stringify({ labels: meta.labels, predictions }));
}

main().catch((e) => { console.error(e.message || e); process.exit(1); });
