// The in-page driver of benchmarks/web_litertjs.py: the same calls for LiteRT.js (@litertjs/core, WASM/XNNPack
// CPU backend) and ONNX Runtime Web (through the web artifact's own predict.js). One page holds one runtime.
//   await setup({runtime: 'litertjs' | 'ort', model, threads}) -> {loadMs, threads, ...}
//   await runBatch(b64, n, dims, dtype) -> base64 of the n outputs, concatenated (float32)
//   await timed(runs, warmup) -> per-call ms on the last input given to runBatch
// A timed call = wrap the input in the runtime's tensor + run + read the output into a JS TypedArray + free.

let impl = null;
let lastInput = null;

const b2u = (s) => {
  const b = atob(s), u = new Uint8Array(b.length);
  for (let i = 0; i < b.length; i++) u[i] = b.charCodeAt(i);
  return u;
};
const u2b = (u) => {
  let s = '';
  for (let i = 0; i < u.length; i += 32768) s += String.fromCharCode.apply(null, u.subarray(i, i + 32768));
  return btoa(s);
};
const TYPES = { float32: Float32Array, int8: Int8Array, uint8: Uint8Array, int32: Int32Array };

async function setupLiteRt(model, threads) {
  const lrt = await import('./litertjs/core/index.js');
  const t0 = performance.now();
  const wasmDir = new URL('./litertjs/wasm/', location.href).href;
  await lrt.loadLiteRt(wasmDir, threads > 1 ? { threads: true } : {});
  const tWasm = performance.now();
  const compiled = await lrt.loadAndCompile(new URL(model, location.href).href,
    { accelerator: 'wasm', cpuOptions: { numThreads: threads } });
  const loadMs = performance.now() - t0;
  const inp = compiled.getInputDetails(), out = compiled.getOutputDetails();
  const wasm = lrt.getGlobalLiteRt().liteRtWasm;
  impl = {
    async run(data, dims) {
      const t = new lrt.Tensor(data, dims);
      const res = await compiled.run(t);
      const y = res[0].toTypedArray().slice();
      t.delete();
      for (const r of res) r.delete();
      return y;
    },
  };
  return {
    loadMs, wasmMs: tWasm - t0, threads, wasmThreads: wasm.getThreadCount ? wasm.getThreadCount() : null,
    fullyAccelerated: compiled.isFullyAccelerated,
    inputs: inp.map((d) => ({ name: d.name, dtype: d.dtype, shape: Array.from(d.shape) })),
    outputs: out.map((d) => ({ name: d.name, dtype: d.dtype, shape: Array.from(d.shape) })),
  };
}

async function setupOrt(model, threads) {
  const t0 = performance.now();
  const m = await import(new URL(model, location.href).href);  // the web artifact's predict.js
  const p = await m.load({ threads });
  const loadMs = performance.now() - t0;
  const ort = p.ort, name = p.session.inputNames[0], outName = p.session.outputNames[0];
  impl = {
    async run(data, dims) {
      const res = await p.session.run({ [name]: new ort.Tensor('float32', data, dims) });
      const y = res[outName].data.slice();
      for (const k of Object.keys(res)) res[k].dispose?.();
      return y;
    },
  };
  return { loadMs, threads: p.threads, inputs: [{ name, shape: p.inputDims() }], outputs: [{ name: outName }] };
}

export async function setup({ runtime, model, threads }) {
  try {
    const info = runtime === 'litertjs' ? await setupLiteRt(model, threads) : await setupOrt(model, threads);
    return { ok: true, isolated: crossOriginIsolated, ...info };
  } catch (e) {
    return { ok: false, error: String((e && (e.stack || e.message)) || e) };
  }
}

export async function runBatch(b64, n, dims, dtype) {
  try {
    const all = new TYPES[dtype](b2u(b64).buffer);
    const per = all.length / n;
    const outs = [];
    for (let i = 0; i < n; i++) {
      lastInput = all.slice(i * per, (i + 1) * per);
      outs.push(await impl.run(lastInput, dims));
    }
    const total = outs.reduce((a, o) => a + o.length, 0);
    const cat = new outs[0].constructor(total);
    let off = 0;
    for (const o of outs) { cat.set(o, off); off += o.length; }
    return { ok: true, dtype: cat.constructor.name, b64: u2b(new Uint8Array(cat.buffer)) };
  } catch (e) {
    return { ok: false, error: String((e && (e.stack || e.message)) || e) };
  }
}

export async function timed(runs, warmup, dims) {
  try {
    for (let i = 0; i < warmup; i++) await impl.run(lastInput, dims);
    const ms = [];
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      await impl.run(lastInput, dims);
      ms.push(performance.now() - t0);
    }
    return { ok: true, ms };
  } catch (e) {
    return { ok: false, error: String((e && (e.stack || e.message)) || e) };
  }
}
