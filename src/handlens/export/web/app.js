// handlens' offline page: an image -> the exported model (onnxruntime-web, WebAssembly) -> class probabilities
// and a class activation map, all on this device. Preprocessing follows preprocess.json exactly as handlens does
// it in Python: decode upright, alpha on black, PIL's own resampling (Resample.c: separable convolution with
// 22-bit fixed-point coefficients), shorter-crop / stretch / letterbox, then the normalisation, NCHW float32.
// A patch-trained model (preprocess.json's "patches") sees the image as handlens' Bundle.predict_proba and
// explain.tiles do: the working image (longer side working_side, PIL bicubic), its grid of patches (torchvision's
// antialiased bilinear to the model input) averaged for the probabilities, and tiles of patch_size with the
// service's overlap whose CAMs are stitched with its cross-fade into one map over the working image.
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

  // precompute_coeffs: the (fixed-point) weights of each output pixel over input [0, in1) of inSize pixels.
  // torchBits: torch's uint8 antialiased kernel (UpSampleKernel.cpp) instead of PIL's: the same double weights,
  // rounded to int16 with the most fractional bits (at most 22) that keep the largest weight below 2^15
  function coefficients(inSize, in1, outSize, filter, torchBits) {
    const scale = in1 / outSize;
    const filterscale = Math.max(scale, 1.0);
    const support = filter.support * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const kk = new Int32Array(outSize * ksize);
    const bounds = new Int32Array(outSize * 2);
    const ss = 1.0 / filterscale;
    const w = new Float64Array(ksize), norm = new Float64Array(outSize * ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) { w[x] = filter.f((x + xmin - center + 0.5) * ss); ww += w[x]; }
      for (let x = 0; x < xmax; x++) norm[xx * ksize + x] = ww !== 0.0 ? w[x] / ww : w[x];
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    let bits = PRECISION_BITS;
    if (torchBits) {
      let top = 0.0;
      for (const k of norm) top = Math.max(top, k);
      for (bits = 0; bits < 22; bits++) if (Math.trunc(0.5 + top * 2 ** (bits + 1)) >= 1 << 15) break;
    }
    for (let i = 0; i < norm.length; i++) {
      const k = norm[i];
      kk[i] = k < 0 ? Math.trunc(-0.5 + k * (1 << bits)) : Math.trunc(0.5 + k * (1 << bits));
    }
    return {kk, bounds, ksize, bits};
  }

  function clip8(v, bits) {
    if (v >= 255 * (1 << bits)) return 255;
    if (v <= 0) return 0;
    return Math.floor(v / (1 << bits));
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

  function horizontal(src, w, h, boxW, outW, filter, torchBits) {
    const {kk, bounds, ksize, bits} = coefficients(w, boxW, outW, filter, torchBits);
    const out = new Uint8Array(outW * h * 3);
    for (let y = 0; y < h; y++) {
      const row = y * w * 3;
      for (let xx = 0; xx < outW; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], k0 = xx * ksize;
        let s0 = 1 << (bits - 1), s1 = s0, s2 = s0;
        for (let x = 0; x < xmax; x++) {
          const k = kk[k0 + x], p = row + (x + xmin) * 3;
          s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
        }
        const q = (y * outW + xx) * 3;
        out[q] = clip8(s0, bits); out[q + 1] = clip8(s1, bits); out[q + 2] = clip8(s2, bits);
      }
    }
    return out;
  }

  function vertical(src, w, h, boxH, outH, filter, torchBits) {
    const {kk, bounds, ksize, bits} = coefficients(h, boxH, outH, filter, torchBits);
    const out = new Uint8Array(w * outH * 3);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1], k0 = yy * ksize;
      for (let x = 0; x < w; x++) {
        let s0 = 1 << (bits - 1), s1 = s0, s2 = s0;
        for (let y = 0; y < ymax; y++) {
          const k = kk[k0 + y], p = ((y + ymin) * w + x) * 3;
          s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
        }
        const q = (yy * w + x) * 3;
        out[q] = clip8(s0, bits); out[q + 1] = clip8(s1, bits); out[q + 2] = clip8(s2, bits);
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

  // ------------------------------------------------------------------------------- patch-trained models
  // torchvision's resize(antialias=True) of a uint8 patch (torch's native uint8 kernel): horizontal, then vertical
  function torchBilinear(rgb, w, h, outW, outH) {
    const filter = FILTERS.bilinear;
    const once = outW !== w ? horizontal(rgb, w, h, w, outW, filter, true) : rgb;
    return outH !== h ? vertical(once, outW, h, h, outH, filter, true) : once;
  }

  // decode_working: the longer side scaled to working_side (PIL bicubic; never enlarged; 0 keeps full resolution)
  function workingImage(rgb, w, h) {
    const side = spec.patches.working_side, scale = side ? side / Math.max(w, h) : 1.0;
    if (scale >= 1.0) return {rgb, w, h};
    const ow = Math.max(1, pyRound(w * scale)), oh = Math.max(1, pyRound(h * scale));
    return {rgb: resize(rgb, w, h, ow, oh, 'bicubic', scale < 0.5 ? 3.0 : 0), w: ow, h: oh};
  }

  // np.linspace(start, stop, num).round() (half to even)
  function linspaceRound(start, stop, num) {
    if (num === 1) return [pyRound(start)];
    const step = (stop - start) / (num - 1), out = [];
    for (let i = 0; i < num; i++) out.push(pyRound(i === num - 1 ? stop : i * step + start));
    return out;
  }

  // transforms.patches.grid_boxes without a ROI: [top, left, side] boxes, rows first, thinned to grid_max
  function gridBoxes(h, w) {
    const p = spec.patches, side = Math.max(1, Math.min(h, w, p.patch_size));
    const rows = Math.ceil(h / side), cols = Math.ceil(w / side);
    const tops = rows > 1 ? linspaceRound(0, h - side, rows) : [Math.floor((h - side) / 2)];
    const lefts = cols > 1 ? linspaceRound(0, w - side, cols) : [Math.floor((w - side) / 2)];
    let boxes = [];
    for (const top of tops) for (const left of lefts) boxes.push([top, left, side]);
    const most = p.prediction.grid_max;
    if (boxes.length > most) boxes = linspaceRound(0, boxes.length - 1, most).map((i) => boxes[i]);
    return boxes;
  }

  function crop(img, left, top, side) {
    const out = new Uint8Array(side * side * 3);
    for (let y = 0; y < side; y++) {
      const start = ((top + y) * img.w + left) * 3;
      out.set(img.rgb.subarray(start, start + side * 3), y * side * 3);
    }
    return out;
  }

  // explain.tiles.tile_origins: starts along one axis, the last tile ending at the edge
  function tileOrigins(length, tile, overlap) {
    if (tile >= length) return [0];
    const stride = Math.max(1, pyRound(tile * (1 - overlap))), out = [];
    for (let o = 0; o <= length - tile; o += stride) out.push(o);
    if (out[out.length - 1] !== length - tile) out.push(length - tile);
    return out;
  }

  // explain.tiles.cross_fade: outer(r, r), r falling from 1 at the centre to 1 / tile at the edges (float32)
  function crossFade(tile) {
    const r = new Float64Array(tile), out = new Float32Array(tile * tile);
    for (let i = 0; i < tile; i++) r[i] = Math.min(i + 0.5, tile - i - 0.5) / (tile / 2);
    for (let i = 0; i < tile; i++) for (let j = 0; j < tile; j++) out[i * tile + j] = r[i] * r[j];
    return out;
  }

  // bilinear resize of an (h, w) map to (outH, outW), align_corners=false (F.interpolate)
  function upsample(map, h, w, outH, outW) {
    const ay = axis(outH, h), ax = axis(outW, w), out = new Float64Array(outH * outW);
    for (let y = 0; y < outH; y++) {
      const wy = ay.wt[y], r0 = ay.lo[y] * w, r1 = ay.hi[y] * w;
      for (let x = 0; x < outW; x++) {
        const wx = ax.wt[x], l = ax.lo[x], h1 = ax.hi[x];
        out[y * outW + x] = (1 - wy) * ((1 - wx) * map[r0 + l] + wx * map[r0 + h1]) +
          wy * ((1 - wx) * map[r1 + l] + wx * map[r1 + h1]);
      }
    }
    return out;
  }

  // the model on many (3, S, S) inputs: batches of 16 where the export has a dynamic batch axis, else one by one
  async function runMany(inputs) {
    const size = spec.size, n3 = 3 * size * size, C = spec.classes.length, results = [];
    const chunk = typeof spec.input.shape[0] === 'string' ? 16 : 1;
    let ms = 0;
    for (let start = 0; start < inputs.length; start += chunk) {
      const part = inputs.slice(start, start + chunk), data = new Float32Array(part.length * n3);
      part.forEach((x, i) => data.set(x, i * n3));
      const t0 = performance.now();
      const out = await session.run({[spec.input.name]: new ort.Tensor('float32', data, [part.length, 3, size, size])});
      ms += performance.now() - t0;
      for (let i = 0; i < part.length; i++) {
        const item = {logits: Array.from(out.logits.data.subarray(i * C, (i + 1) * C))};
        if (out.features) {
          const [, K, fh, fw] = out.features.dims, m = K * fh * fw;
          item.features = out.features.data.subarray(i * m, (i + 1) * m);
          item.dims = [1, K, fh, fw];
        }
        results.push(item);
      }
    }
    return {results, ms};
  }

  // one class's map over the working image: each tile's CAM (feature map -> model input -> tile, bilinear),
  // cross-faded, summed, divided by the summed weights (explain.tiles.tiled_explain), then scaled to max 1
  function stitch(tiles, cls) {
    if (tiles.stitched[cls]) return tiles.stitched[cls];
    const {w, h, tile, origins, maps, fh, fw} = tiles, size = spec.size, fade = crossFade(tile);
    const heat = new Float64Array(w * h), weight = new Float64Array(w * h);
    origins.forEach(([x, y], t) => {
      let m = upsample(maps[t][cls], fh, fw, size, size);
      if (tile !== size) m = upsample(m, size, size, tile, tile);
      for (let i = 0; i < tile; i++) {
        for (let j = 0; j < tile; j++) {
          const q = (y + i) * w + x + j, f = fade[i * tile + j];
          heat[q] += m[i * tile + j] * f; weight[q] += f;
        }
      }
    });
    let top = 0;
    for (let q = 0; q < heat.length; q++) { heat[q] /= weight[q]; top = Math.max(top, heat[q]); }
    if (top > 0) for (let q = 0; q < heat.length; q++) heat[q] /= top;
    tiles.stitched[cls] = heat;
    return heat;
  }

  async function predictPatches(file) {
    const t0 = performance.now();
    const decoded = await decode(file);
    const img = workingImage(decoded.rgb, decoded.w, decoded.h), size = spec.size;
    const boxes = gridBoxes(img.h, img.w);
    const gridPixels = boxes.map(([top, left, side]) => {
      const c = crop(img, left, top, side);
      return side === size ? c : torchBilinear(c, side, side, size, size);
    });
    const tPre = performance.now();
    const grid = await runMany(gridPixels.map(normalise));
    const probs = new Array(spec.classes.length).fill(0);
    for (const r of grid.results) softmax(r.logits).forEach((p, i) => { probs[i] += p; });
    for (let i = 0; i < probs.length; i++) probs[i] /= grid.results.length;
    const top = probs.indexOf(Math.max(...probs));
    let tiles = null, ms = grid.ms;
    if (spec.cam && spec.cam.available) {
      const tile = Math.min(spec.patches.patch_size, img.h, img.w), overlap = spec.patches.explanation.overlap;
      const origins = [];
      for (const y of tileOrigins(img.h, tile, overlap)) for (const x of tileOrigins(img.w, tile, overlap)) origins.push([x, y]);
      const run = await runMany(origins.map(([x, y]) => {
        const c = crop(img, x, y, tile);
        return normalise(tile === size ? c : resize(c, tile, tile, size, size, 'bicubic'));
      }));
      ms += run.ms;
      const [, , fh, fw] = run.results[0].dims;
      tiles = {w: img.w, h: img.h, tile, origins, fh, fw, stitched: {},
        maps: run.results.map((r) => cams(r.features, r.dims))};
    }
    last = {patchMode: true, img, probs, tiles, top};
    window.handlensGrid = {boxes, pixels: gridPixels};
    const map = tiles ? stitch(tiles, top) : null;
    window.handlensResult = {file: file.name, width: decoded.w, height: decoded.h, probabilities: probs, predicted: top,
      class: spec.classes[top], cam: map ? Array.from(map) : null, camShape: map ? [img.h, img.w] : null,
      pixels: Array.from(img.rgb), workingShape: [img.h, img.w], patches: boxes.length,
      tiles: tiles ? tiles.origins : null, inferenceMs: ms, preprocessMs: tPre - t0, totalMs: performance.now() - t0};
    render();
    $('timing').textContent = `${decoded.w} x ${decoded.h} image, ${img.w} x ${img.h} working; ${boxes.length} patches` +
      `${tiles ? `, ${tiles.origins.length} map tiles` : ''}; model ${ms.toFixed(1)} ms (WebAssembly)`;
    return window.handlensResult;
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
    if (spec.patches) return predictPatches(file);
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

  // a patch-trained model's result: the working image, with the stitched map of the chosen class over it
  function renderPatches(ctx, canvas, cls) {
    const {img, tiles} = last, D = canvas.width, Dh = Math.max(1, Math.round((D * img.h) / img.w));
    if (canvas.height !== Dh) canvas.height = Dh;
    const map = tiles ? stitch(tiles, cls) : null, alpha = Number($('opacity').value), image = ctx.createImageData(D, Dh);
    for (let y = 0; y < Dh; y++) {
      const sy = Math.min(img.h - 1, Math.floor((y * img.h) / Dh));
      for (let x = 0; x < D; x++) {
        const sx = Math.min(img.w - 1, Math.floor((x * img.w) / D)), p = (sy * img.w + sx) * 3, q = (y * D + x) * 4;
        let r = img.rgb[p], g = img.rgb[p + 1], b = img.rgb[p + 2];
        if (map) {
          const v = map[sy * img.w + sx], [cr, cg, cb] = colour(v), a = alpha * Math.min(1, v * 1.5);
          r = r * (1 - a) + cr * a; g = g * (1 - a) + cg * a; b = b * (1 - a) + cb * a;
        }
        image.data[q] = r; image.data[q + 1] = g; image.data[q + 2] = b; image.data[q + 3] = 255;
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  function render() {
    if (!last) return;
    $('result').hidden = false;
    if (last.patchMode) {
      renderPatches($('canvas').getContext('2d'), $('canvas'), Number($('class').value || last.top));
      probabilityTable();
      return;
    }
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
    probabilityTable();
  }

  function probabilityTable() {
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
