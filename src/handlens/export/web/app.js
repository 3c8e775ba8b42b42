// handlens' offline page: an image -> the exported model (onnxruntime-web, WebAssembly) -> class probabilities
// and a class activation map, all on this device. Preprocessing follows preprocess.json exactly as handlens does
// it in Python: decode upright, alpha on black, PIL's own resampling (Resample.c: separable convolution with
// 22-bit fixed-point coefficients), shorter-crop / stretch / letterbox, then the normalisation, NCHW float32.
'use strict';

(function () {
  // larger images are refused (decoding them could exhaust a phone's memory); ?maxPixels=N lowers the limit
  const MAX_PIXELS = Number(new URLSearchParams(location.search).get('maxPixels')) || 50e6;
  const MAX_BYTES = 100 * 1024 * 1024;
  const $ = (id) => document.getElementById(id);
  let spec = null;
  let session = null;
  let last = null; // {input uint8, probs, cams, h, w}

  // ------------------------------------------------------------------------------------- PIL resampling
  const PRECISION_BITS = 32 - 8 - 2;
  const FILTERS = {
    bilinear: {support: 1.0, f: (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; }},
    bicubic: {support: 2.0, f: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    }},
  };

  // precompute_coeffs: the (fixed-point) weights of each output pixel over input [0, in1) of inSize pixels
  function coefficients(inSize, in1, outSize, filter) {
    const scale = in1 / outSize;
    const filterscale = Math.max(scale, 1.0);
    const support = filter.support * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const kk = new Int32Array(outSize * ksize);
    const bounds = new Int32Array(outSize * 2);
    const ss = 1.0 / filterscale;
    const w = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) { w[x] = filter.f((x + xmin - center + 0.5) * ss); ww += w[x]; }
      for (let x = 0; x < xmax; x++) {
        const k = ww !== 0.0 ? w[x] / ww : w[x];
        kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * (1 << PRECISION_BITS)) : Math.trunc(0.5 + k * (1 << PRECISION_BITS));
      }
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    return {kk, bounds, ksize};
  }

  function clip8(v) {
    if (v >= 255 * (1 << PRECISION_BITS)) return 255;
    if (v <= 0) return 0;
    return Math.floor(v / (1 << PRECISION_BITS));
  }

  // PIL's ImagingReduce: the mean of each fx x fy box (partial boxes at the right and bottom edges), rounded as
  // Reduce.c does it ((sum + n / 2) * floor32(2^24 / n) >> 24, the multiplier computed in single precision)
  function reduce(rgb, w, h, fx, fy) {
    const ow = Math.ceil(w / fx), oh = Math.ceil(h / fy), out = new Uint8Array(ow * oh * 3);
    for (let y = 0; y < oh; y++) {
      const y0 = y * fy, y1 = Math.min(h, y0 + fy);
      for (let x = 0; x < ow; x++) {
        const x0 = x * fx, x1 = Math.min(w, x0 + fx), n = (y1 - y0) * (x1 - x0);
        const mult = Math.trunc(Math.fround(4294967296 / Math.fround(256 * n))), amend = Math.floor(n / 2);
        let s0 = amend, s1 = amend, s2 = amend;
        for (let yy = y0; yy < y1; yy++) {
          for (let xx = x0; xx < x1; xx++) { const p = (yy * w + xx) * 3; s0 += rgb[p]; s1 += rgb[p + 1]; s2 += rgb[p + 2]; }
        }
        const q = (y * ow + x) * 3;
        out[q] = Math.floor((s0 * mult) / 16777216); out[q + 1] = Math.floor((s1 * mult) / 16777216);
        out[q + 2] = Math.floor((s2 * mult) / 16777216);
      }
    }
    return {rgb: out, w: ow, h: oh};
  }

  // rgb: Uint8Array (h, w, 3) -> (outH, outW, 3), as PIL's Image.resize (horizontal pass, then vertical);
  // gap: PIL's reducing_gap (a box reduce by int(scale / gap) first, then the filter over the fractional box)
  function resize(rgb, w, h, outW, outH, interpolation, gap) {
    if (w === outW && h === outH) return rgb;
    let boxW = w, boxH = h;
    if (gap && interpolation !== 'nearest') {
      const fx = Math.trunc(w / outW / gap) || 1, fy = Math.trunc(h / outH / gap) || 1;
      if (fx > 1 || fy > 1) {
        ({rgb, w, h} = reduce(rgb, w, h, fx, fy));
        boxW /= fx; boxH /= fy;
      }
    }
    if (interpolation === 'nearest') {
      const out = new Uint8Array(outW * outH * 3);
      const sx = w / outW, sy = h / outH;
      for (let y = 0; y < outH; y++) {
        const iy = Math.min(h - 1, Math.floor((y + 0.5) * sy));
        for (let x = 0; x < outW; x++) {
          const ix = Math.min(w - 1, Math.floor((x + 0.5) * sx));
          for (let c = 0; c < 3; c++) out[(y * outW + x) * 3 + c] = rgb[(iy * w + ix) * 3 + c];
        }
      }
      return out;
    }
    const filter = FILTERS[interpolation];
    const needH = outW !== w || boxW !== w, needV = outH !== h || boxH !== h;
    if (needH && needV && verticalFirst(w, h, outW, outH)) {
      return horizontal(vertical(rgb, w, h, boxH, outH, filter), w, outH, boxW, outW, filter);
    }
    const once = needH ? horizontal(rgb, w, h, boxW, outW, filter) : rgb;
    return needV ? vertical(once, needH ? outW : w, h, boxH, outH, filter) : once;
  }

  // Which of the two passes Pillow 13 runs first. It is not always the horizontal one (Resample.c of earlier
  // releases): a pass that enlarges runs after one that shrinks, and for an image shrunk along both axes the
  // vertical pass runs first when the image is tall enough; the rule below reproduces Pillow 13's choice on
  // every shape measured except about 1 in 20 shrunk both ways (mostly images more than twice as tall as
  // wide), where pixels then differ by one level.
  function verticalFirst(w, h, outW, outH) {
    const downX = outW < w, downY = outH < h;
    if (downX !== downY) return downY;
    if (!downX) return false;
    return h * h * outW > 2 * w * w * outH;
  }

  function horizontal(src, w, h, boxW, outW, filter) {
    const {kk, bounds, ksize} = coefficients(w, boxW, outW, filter);
    const out = new Uint8Array(outW * h * 3);
    for (let y = 0; y < h; y++) {
      const row = y * w * 3;
      for (let xx = 0; xx < outW; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], k0 = xx * ksize;
        let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
        for (let x = 0; x < xmax; x++) {
          const k = kk[k0 + x], p = row + (x + xmin) * 3;
          s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
        }
        const q = (y * outW + xx) * 3;
        out[q] = clip8(s0); out[q + 1] = clip8(s1); out[q + 2] = clip8(s2);
      }
    }
    return out;
  }

  function vertical(src, w, h, boxH, outH, filter) {
    const {kk, bounds, ksize} = coefficients(h, boxH, outH, filter);
    const out = new Uint8Array(w * outH * 3);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1], k0 = yy * ksize;
      for (let x = 0; x < w; x++) {
        let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
        for (let y = 0; y < ymax; y++) {
          const k = kk[k0 + y], p = ((y + ymin) * w + x) * 3;
          s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
        }
        const q = (yy * w + x) * 3;
        out[q] = clip8(s0); out[q + 1] = clip8(s1); out[q + 2] = clip8(s2);
      }
    }
    return out;
  }

  // Python's round(): half to even
  function pyRound(v) {
    const f = Math.floor(v), d = v - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  // handlens.transforms.preprocess.input_placement + preprocess_image (without morphology)
  function modelPixels(rgb, w, h) {
    const size = spec.size, interp = spec.interpolation;
    if (spec.resize === 'stretch') return resize(rgb, w, h, size, size, interp);
    const out = new Uint8Array(size * size * 3);
    if (spec.resize === 'letterbox') {
      const scale = size / Math.max(w, h);
      const iw = Math.max(1, pyRound(w * scale)), ih = Math.max(1, pyRound(h * scale));
      const ox = Math.floor((size - iw) / 2), oy = Math.floor((size - ih) / 2);
      const inner = resize(rgb, w, h, iw, ih, interp);
      for (let y = 0; y < ih; y++) out.set(inner.subarray(y * iw * 3, (y + 1) * iw * 3), ((y + oy) * size + ox) * 3);
      return out;
    }
    const scale = size / Math.min(w, h);
    const ow = Math.max(size, pyRound(w * scale)), oh = Math.max(size, pyRound(h * scale));
    const ox = Math.floor((ow - size) / 2), oy = Math.floor((oh - size) / 2);
    const gap = size / Math.min(w, h) < 0.5 ? 3.0 : 0; // preprocess_image's reducing_gap for big images
    const outer = resize(rgb, w, h, ow, oh, interp, gap);
    for (let y = 0; y < size; y++) out.set(outer.subarray(((y + oy) * ow + ox) * 3, ((y + oy) * ow + ox + size) * 3), y * size * 3);
    return out;
  }

  // handlens.transforms.preprocess.normalize_batch for one image: (S, S, 3) uint8 -> (1, 3, S, S) float32
  function normalise(pixels) {
    const size = spec.size, n = size * size, data = new Float32Array(3 * n);
    const f = Math.fround;
    if (spec.normalize === 'backbone' || spec.normalize === 'dataset') {
      for (let c = 0; c < 3; c++) {
        const std = f(spec.std[c]), scale = f(1.0 / f(std * 255.0)), shift = f(-f(spec.mean[c]) / std);
        for (let i = 0; i < n; i++) data[c * n + i] = pixels[i * 3 + c] * scale + shift;
      }
      return data;
    }
    for (let c = 0; c < 3; c++) for (let i = 0; i < n; i++) data[c * n + i] = pixels[i * 3 + c];
    if (spec.normalize === 'unit') { for (let i = 0; i < data.length; i++) data[i] = data[i] / 255.0; return data; }
    let low, high;
    if (spec.normalize === 'minmax') {
      low = Infinity; high = -Infinity;
      for (let i = 0; i < data.length; i++) { low = Math.min(low, data[i]); high = Math.max(high, data[i]); }
    } else if (spec.normalize === 'percentile') {
      const sorted = Float32Array.from(data).sort();
      const q = (p) => { const pos = (p / 100) * (sorted.length - 1), i = Math.floor(pos), t = pos - i;
        return i + 1 < sorted.length ? sorted[i] + (sorted[i + 1] - sorted[i]) * t : sorted[i]; };
      low = q(spec.clip_percentiles[0]); high = q(spec.clip_percentiles[1]);
    } else {
      throw new Error('unknown normalisation ' + spec.normalize);
    }
    const span = Math.max(high - low, 1e-6);
    for (let i = 0; i < data.length; i++) data[i] = Math.min(1, Math.max(0, (data[i] - low) / span));
    return data;
  }

  // ------------------------------------------------------------------------------------------ decoding
  async function decode(file) {
    if (!file) throw new Error('No file was given.');
    if (file.type && !file.type.startsWith('image/')) throw new Error(`${file.name} is not an image (${file.type}).`);
    if (file.size > MAX_BYTES) throw new Error(`${file.name} is ${(file.size / 1e6).toFixed(0)} MB; the limit is ${MAX_BYTES / 1e6} MB.`);
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, {imageOrientation: 'from-image', premultiplyAlpha: 'none', colorSpaceConversion: 'none'});
    } catch (err) {
      throw new Error(`${file.name} could not be read as an image (${err.message || err}).`);
    }
    const w = bitmap.width, h = bitmap.height;
    if (w * h > MAX_PIXELS) { bitmap.close(); throw new Error(`${file.name} is ${w} x ${h} pixels; the limit is ${MAX_PIXELS >= 1e6 ? MAX_PIXELS / 1e6 + ' megapixels' : MAX_PIXELS + ' pixels'}.`); }
    const canvas = document.createElement('canvas');
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext('2d', {willReadFrequently: true});
    ctx.fillStyle = '#000'; ctx.fillRect(0, 0, w, h); // PIL flattens alpha on black
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = ctx.getImageData(0, 0, w, h).data, rgb = new Uint8Array(w * h * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) { rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2]; }
    return {rgb, w, h};
  }

  // ----------------------------------------------------------------------------------------- inference
  function softmax(logits) {
    const m = Math.max(...logits), e = logits.map((v) => Math.exp(v - m)), s = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / s);
  }

  // cam_from_outputs at feature resolution: relu(sum_k W[c][k] features[k] / (h w)), one array per class
  function cams(features, dims) {
    const [, K, h, w] = dims, hw = h * w, weight = spec.cam.weight;
    return weight.map((row) => {
      const map = new Float64Array(hw);
      for (let k = 0; k < K; k++) { const wk = row[k]; if (wk === 0) continue; for (let i = 0; i < hw; i++) map[i] += wk * features[k * hw + i]; }
      for (let i = 0; i < hw; i++) map[i] = Math.max(0, map[i] / hw);
      return Array.from(map);
    });
  }

  async function runModel(input) {
    const size = spec.size;
    const feeds = {[spec.input.name]: new ort.Tensor('float32', input, [1, 3, size, size])};
    const t0 = performance.now();
    const out = await session.run(feeds);
    const ms = performance.now() - t0;
    return {out, ms};
  }

  async function predict(file) {
    showError('');
    const t0 = performance.now();
    const {rgb, w, h} = await decode(file);
    const pixels = modelPixels(rgb, w, h);
    const input = normalise(pixels);
    const tPre = performance.now();
    const {out, ms} = await runModel(input);
    const logits = Array.from(out.logits.data);
    const probs = softmax(logits);
    const top = probs.indexOf(Math.max(...probs));
    let maps = null, fh = 0, fw = 0;
    if (spec.cam && spec.cam.available && out.features) {
      [, , fh, fw] = out.features.dims;
      maps = cams(out.features.data, out.features.dims);
    }
    last = {pixels, probs, maps, fh, fw, top};
    window.handlensResult = {file: file.name, width: w, height: h, logits, probabilities: probs, predicted: top,
      class: spec.classes[top], cam: maps, camShape: maps ? [fh, fw] : null, pixels: Array.from(pixels),
      inferenceMs: ms, preprocessMs: tPre - t0, totalMs: performance.now() - t0};
    render();
    $('timing').textContent = `${w} x ${h} image; preprocessing ${(tPre - t0).toFixed(1)} ms, model ${ms.toFixed(1)} ms (WebAssembly)`;
    return window.handlensResult;
  }

  // ------------------------------------------------------------------------------------------- drawing
  function colour(t) { // a blue-cyan-yellow-red ramp for 0..1
    const r = Math.min(1, Math.max(0, 1.5 * t - 0.25 + (t > 0.75 ? 0 : 0))), g = Math.min(1, Math.max(0, 1.5 - Math.abs(2 * t - 1.1) * 1.6));
    const b = Math.min(1, Math.max(0, 1.2 - 2 * t));
    return [255 * r, 255 * g, 255 * b];
  }

  // bilinear upsampling with align_corners=false (the weights of onnx._bilinear_matrix)
  function axis(out, size) {
    const lo = new Int32Array(out), hi = new Int32Array(out), wt = new Float64Array(out), scale = size / out;
    for (let i = 0; i < out; i++) {
      const s = Math.max((i + 0.5) * scale - 0.5, 0), l = Math.min(Math.floor(s), size - 1);
      lo[i] = l; hi[i] = Math.min(l + 1, size - 1); wt[i] = s - l;
    }
    return {lo, hi, wt};
  }

  function render() {
    if (!last) return;
    $('result').hidden = false;
    const size = spec.size, canvas = $('canvas'), D = canvas.width;
    const ctx = canvas.getContext('2d');
    const image = ctx.createImageData(D, D), px = last.pixels, cls = Number($('class').value || last.top);
    let map = null, max = 0;
    if (last.maps) { map = last.maps[cls]; for (const v of map) max = Math.max(max, v); }
    const alpha = Number($('opacity').value);
    const ax = last.maps ? axis(D, last.fw) : null, ay = last.maps ? axis(D, last.fh) : null;
    for (let y = 0; y < D; y++) {
      const sy = Math.min(size - 1, Math.floor((y * size) / D));
      for (let x = 0; x < D; x++) {
        const sx = Math.min(size - 1, Math.floor((x * size) / D)), p = (sy * size + sx) * 3, q = (y * D + x) * 4;
        let r = px[p], g = px[p + 1], b = px[p + 2];
        if (map && max > 0) {
          const fw = last.fw, wy = ay.wt[y], wx = ax.wt[x];
          const v = ((1 - wy) * ((1 - wx) * map[ay.lo[y] * fw + ax.lo[x]] + wx * map[ay.lo[y] * fw + ax.hi[x]]) +
            wy * ((1 - wx) * map[ay.hi[y] * fw + ax.lo[x]] + wx * map[ay.hi[y] * fw + ax.hi[x]])) / max;
          const [cr, cg, cb] = colour(v), a = alpha * Math.min(1, v * 1.5);
          r = r * (1 - a) + cr * a; g = g * (1 - a) + cg * a; b = b * (1 - a) + cb * a;
        }
        image.data[q] = r; image.data[q + 1] = g; image.data[q + 2] = b; image.data[q + 3] = 255;
      }
    }
    ctx.putImageData(image, 0, 0);
    const body = $('probabilities').querySelector('tbody');
    body.replaceChildren(...spec.classes.map((name, i) => {
      const tr = document.createElement('tr');
      if (i === last.top) tr.className = 'top';
      const p = last.probs[i];
      const cells = [name, (100 * p).toFixed(1) + ' %'];
      for (const text of cells) { const td = document.createElement('td'); td.textContent = text; tr.append(td); }
      const bar = document.createElement('td'); bar.className = 'bar';
      const span = document.createElement('span'); span.style.width = `${Math.round(120 * p)}px`; bar.append(span);
      tr.append(bar);
      return tr;
    }));
  }

  // ------------------------------------------------------------------------------------------ the page
  function showError(text) { const el = $('error'); el.textContent = text; el.hidden = !text; }

  async function handle(file) {
    try {
      $('status').textContent = `Reading ${file ? file.name : ''}...`;
      if (!session) throw new Error('The model is not loaded yet.');
      const result = await predict(file);
      $('class').value = String(result.predicted);
      render();
      $('status').textContent = `${file.name}: ${result.class} (${(100 * result.probabilities[result.predicted]).toFixed(1)} %)`;
    } catch (err) {
      window.handlensError = String(err.message || err);
      showError(window.handlensError);
      $('status').textContent = 'Ready: drop or pick an image.';
    }
  }

  async function init() {
    if ('serviceWorker' in navigator) {
      navigator.serviceWorker.register('sw.js').catch((err) => console.warn('no offline cache:', err));
    }
    spec = await (await fetch('preprocess.json')).json();
    $('model-name').textContent = `${(spec.bundle && spec.bundle.backbone) || ''}: ${spec.classes.join(', ')}`;
    const select = $('class');
    spec.classes.forEach((name, i) => { const o = document.createElement('option'); o.value = String(i); o.textContent = name; select.append(o); });
    if (!(spec.cam && spec.cam.available)) {
      $('map-controls').hidden = true;
      const note = $('maps-note'); note.hidden = false;
      note.textContent = (spec.cam && spec.cam.reason) || 'In-browser maps are not available for this model.';
    }
    ort.env.wasm.numThreads = 1; // threads need cross-origin isolation, which a plain static server does not give
    ort.env.wasm.wasmPaths = new URL('./', location.href).href;
    session = await ort.InferenceSession.create('model.onnx', {executionProviders: ['wasm'], graphOptimizationLevel: 'all'});
    $('status').textContent = 'Ready: drop or pick an image.';
    window.handlensReady = true;
  }

  // ms per image of the model alone on a fixed input (for the benchmark)
  window.handlensBenchmark = async function (runs) {
    const input = new Float32Array(3 * spec.size * spec.size).fill(0.1);
    await runModel(input);
    const times = [];
    for (let i = 0; i < runs; i++) times.push((await runModel(input)).ms);
    times.sort((a, b) => a - b);
    return {median: times[Math.floor(times.length / 2)], min: times[0]};
  };

  $('file').addEventListener('change', (e) => { if (e.target.files.length) handle(e.target.files[0]); e.target.value = ''; });
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => { e.preventDefault(); drop.classList.remove('over'); if (e.dataTransfer.files.length) handle(e.dataTransfer.files[0]); });
  $('class').addEventListener('change', render);
  $('opacity').addEventListener('input', render);
  const online = () => { $('offline').textContent = navigator.onLine ? '' : 'Offline.'; };
  window.addEventListener('online', online); window.addEventListener('offline', online); online();
  init().catch((err) => { window.handlensError = String(err.message || err); $('status').textContent = `The model could not be loaded: ${window.handlensError}`; });
})();
