// bnlab serve: the page. One WebSocket per tab (its own training job); the protocol is docs/web-protocol.md.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const COLORS = { plain: "#d9730d", norm: "#2563eb" };
  const NORM_NAMES = {
    batch: "batch norm", renorm: "batch renorm", ghost: "ghost batch norm", frozen: "frozen BN",
    layer: "layer norm", group: "group norm", instance: "instance norm", none: "no norm (both the same)",
  };
  const MAX_POINTS = 1200; // loss points kept per chart (older ones are thinned, never the newest): a cheap redraw
  const MAX_PROBES = 300; // measurements kept for the percentile, gradient and histogram charts
  // What tests and benchmarks read: redraws of the training charts, slider-to-redraw latencies (ms), errors.
  const stats = { frames: 0, ticks: 0, latencies: [], errors: [], views: {} };
  window.bnlab = { stats, send: (m) => send(m) };

  let ws = null;
  let settings = null;
  let state = "paused";
  let activeTab = "train";
  let viewId = 0;
  const pending = new Map(); // view request id -> time of the input that caused it
  const charts = [];

  // -- formatting --------------------------------------------------------------------------------
  function fmt(v, digits = 3) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(digits - 1);
    return Number(v.toPrecision(digits)).toString();
  }

  // -- the socket ------------------------------------------------------------------------------
  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${scheme}://${location.host}/ws`);
    ws.onopen = () => setConn("connected", "");
    ws.onclose = () => setConn("disconnected: reload the page", "error");
    ws.onmessage = (event) => onMessage(JSON.parse(event.data));
  }
  function send(message) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
  }
  function setConn(text, cls) {
    $("conn").textContent = text;
    $("conn").className = `pill ${cls}`;
  }
  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = false;
    clearTimeout(showError.timer);
    showError.timer = setTimeout(() => { box.hidden = true; }, 10000);
  }

  function onMessage(m) {
    switch (m.type) {
      case "ready":
        applySettings(m.settings);
        setState(m.state, 0);
        requestActiveView();
        break;
      case "settings":
        applySettings(m.values);
        break;
      case "rebuilt":
        clearTraining();
        requestActiveView();
        break;
      case "status":
        setState(m.state, m.step);
        break;
      case "tick":
        stats.ticks += 1;
        onTick(m);
        break;
      case "view":
        onView(m);
        break;
      case "error":
        stats.errors.push(m);
        showError(m.message);
        break;
      default:
        break;
    }
  }

  function setState(s, step) {
    state = s;
    $("state").textContent = s;
    $("state").className = `pill ${s}`;
    $("step").textContent = step;
  }

  // -- the training controls -------------------------------------------------------------------
  const controls = [...document.querySelectorAll("[data-setting]")];
  function controlValue(el) {
    if (el.tagName === "SELECT") return el.value;
    const v = Number(el.value);
    return el.dataset.log ? Number((10 ** v).toPrecision(3)) : v;
  }
  function showOutput(el) {
    const out = document.querySelector(`output[for="${el.id}"]`);
    if (out) out.textContent = fmt(controlValue(el));
  }
  function showValue(el, v) {
    const out = document.querySelector(`output[for="${el.id}"]`);
    if (out) out.textContent = fmt(v);
  }
  function applySettings(values) {
    settings = values;
    for (const el of controls) {
      const v = values[el.dataset.setting];
      if (document.activeElement !== el || el.tagName === "SELECT") {
        el.value = el.dataset.log ? Math.log10(v) : v;
      }
      showValue(el, v); // the value in force, not the slider's rounding of it
    }
    $("norm-name").textContent = `with ${NORM_NAMES[values.norm]}`;
    const layers = values.depth + (values.arch === "cnn" ? 2 : 0);
    fillOptions($("t-layer"), layers, trainLayer);
    $("b-layer").max = layers - 1;
    $("b-unit").max = Math.max(0, (values.arch === "cnn" ? 16 : values.width) - 1);
  }
  function fillOptions(select, n, current) {
    if (select.options.length === n) return;
    select.innerHTML = "";
    for (let i = 0; i < n; i++) select.add(new Option(String(i + 1), String(i)));
    select.value = String(Math.min(current, n - 1));
  }
  let liveTimer = null;
  let liveChanges = {};
  for (const el of controls) {
    const rebuilds = el.tagName === "SELECT" || el.dataset.rebuild || el.type === "number";
    el.addEventListener("input", () => {
      showOutput(el);
      if (rebuilds) return; // sent once the value is chosen ("change"): a rebuild per pixel would stall
      liveChanges[el.dataset.setting] = controlValue(el);
      if (!liveTimer) {
        liveTimer = setTimeout(() => {
          send({ type: "settings", values: liveChanges });
          liveChanges = {};
          liveTimer = null;
        }, 60);
      }
    });
    el.addEventListener("change", () => {
      if (!rebuilds) return;
      const v = controlValue(el);
      if (el.type === "number" && !Number.isInteger(v)) return showError("the seed is a whole number");
      send({ type: "settings", values: { [el.dataset.setting]: v } });
    });
  }
  $("start").addEventListener("click", () => send({ type: "command", action: "start" }));
  $("pause").addEventListener("click", () => send({ type: "command", action: "pause" }));
  $("reset").addEventListener("click", () => send({ type: "command", action: "reset" }));

  // -- charts ----------------------------------------------------------------------------------
  function makeChart(el, series, opts = {}) {
    const height = opts.height || 190;
    const u = new uPlot({
      width: Math.max(200, el.clientWidth || 300),
      height,
      series: [{ label: opts.x || "step" }, ...series],
      scales: { x: { time: false, ...(opts.xScale || {}) }, y: opts.yScale || {} },
      axes: [{ label: opts.xLabel || "" , size: 36 }, { size: 52, ...(opts.yAxis || {}) }],
      bands: opts.bands || [],
      legend: { show: true, live: false },
      cursor: { drag: { x: false, y: false } },
    }, [[], ...series.map(() => [])], el);
    charts.push({ u, el, height });
    return u;
  }
  function dropChart(u) {
    const i = charts.findIndex((c) => c.u === u);
    if (i >= 0) charts.splice(i, 1);
    u.destroy();
  }
  function resizeCharts() {
    for (const c of charts) {
      if (c.el.offsetParent !== null) c.u.setSize({ width: Math.max(200, c.el.clientWidth), height: c.height });
    }
  }
  window.addEventListener("resize", () => requestAnimationFrame(resizeCharts));
  const line = (label, color, extra = {}) => ({ label, stroke: color, width: 1.5, points: { show: false }, ...extra });
  const dots = (label, color) => ({ label, stroke: color, width: 0, points: { show: true, size: 5, fill: color } });

  // -- view 2: live training -------------------------------------------------------------------
  let trainLayer = 0;
  const train = { steps: [], plain: [], norm: [], probes: [] };
  let lossChart, accChart, pctChart, gradChart = null, gradLayers = 0;
  let dirty = false;
  let newProbe = false;
  let lastRate = { t: performance.now(), step: 0 };

  function initTrainCharts() {
    lossChart = makeChart($("c-loss"), [line("without", COLORS.plain), line("with", COLORS.norm)],
      { yScale: { distr: 3 } });
    accChart = makeChart($("c-acc"), [line("without", COLORS.plain), line("with", COLORS.norm)],
      { yScale: { range: [0, 1] } });
    const dash = [4, 3];
    pctChart = makeChart($("c-pct"), [
      line("without p85", COLORS.plain, { dash }), line("without p50", COLORS.plain), line("without p15", COLORS.plain, { dash }),
      line("with p85", COLORS.norm, { dash }), line("with p50", COLORS.norm), line("with p15", COLORS.norm, { dash }),
    ], { bands: [{ series: [1, 3], fill: "rgba(217,115,13,0.12)" }, { series: [4, 6], fill: "rgba(37,99,235,0.12)" }] });
  }
  function clearTraining() {
    train.steps = []; train.plain = []; train.norm = []; train.probes = [];
    lastRate = { t: performance.now(), step: 0 };
    newProbe = true;
    redrawTraining();
  }
  function onTick(m) {
    for (let i = 0; i < m.steps.length; i++) {
      train.steps.push(m.steps[i]);
      train.plain.push(m.loss.plain[i]);
      train.norm.push(m.loss.norm[i]);
    }
    if (train.steps.length > MAX_POINTS) { // thin the older half, keep the recent half whole
      const half = train.steps.length >> 1;
      for (const key of ["steps", "plain", "norm"]) {
        train[key] = train[key].slice(0, half).filter((_, i) => i % 2 === 0).concat(train[key].slice(half));
      }
    }
    if (m.probe) {
      train.probes.push(m.probe);
      if (train.probes.length > MAX_PROBES) train.probes.shift();
      newProbe = true;
    }
    $("step").textContent = m.step;
    const now = performance.now();
    if (now - lastRate.t > 1000) {
      $("rate").textContent = Math.max(0, Math.round((m.step - lastRate.step) * 1000 / (now - lastRate.t)));
      lastRate = { t: now, step: m.step };
    }
    if (m.state !== state) setState(m.state, m.step);
    if (!dirty) {
      dirty = true;
      requestAnimationFrame(redrawTraining);
    }
  }
  function redrawTraining() {
    dirty = false;
    if (activeTab !== "train") return;
    lossChart.setData([train.steps, train.plain, train.norm]);
    stats.frames += 1;
    if (!newProbe) return; // the other charts change only with a new measurement (4 a second)
    newProbe = false;
    const probes = train.probes;
    const ps = probes.map((p) => p.step);
    accChart.setData([ps, probes.map((p) => p.test_acc.plain), probes.map((p) => p.test_acc.norm)]);
    const layer = (p, name) => (p.layers[name].pre[trainLayer] || { p: [null, null, null] }).p;
    pctChart.setData([ps,
      probes.map((p) => layer(p, "plain")[2]), probes.map((p) => layer(p, "plain")[1]), probes.map((p) => layer(p, "plain")[0]),
      probes.map((p) => layer(p, "norm")[2]), probes.map((p) => layer(p, "norm")[1]), probes.map((p) => layer(p, "norm")[0])]);
    drawGrad(probes, ps);
    drawHeat($("m-plain"), $("m-plain-r"), probes.map((p) => p.layers.plain.pre[trainLayer]));
    drawHeat($("m-in"), $("m-in-r"), probes.map((p) => p.layers.norm.in[trainLayer]), "no norm layer");
    drawHeat($("m-norm"), $("m-norm-r"), probes.map((p) => p.layers.norm.pre[trainLayer]));
  }
  function drawGrad(probes, ps) {
    const n = probes.length ? probes[probes.length - 1].grad_norm.plain.length : 0;
    if (n !== gradLayers || !gradChart) {
      if (gradChart) dropChart(gradChart);
      $("c-grad").innerHTML = "";
      const series = [];
      for (const name of ["plain", "norm"]) {
        for (let i = 0; i < n; i++) {
          const alpha = 0.35 + 0.65 * (i + 1) / Math.max(n, 1);
          const rgb = name === "plain" ? "217,115,13" : "37,99,235";
          series.push(line(`${name === "plain" ? "without" : "with"} L${i + 1}`, `rgba(${rgb},${alpha})`));
        }
      }
      gradChart = makeChart($("c-grad"), series, { yScale: { distr: 3 } });
      gradLayers = n;
    }
    const data = [ps];
    for (const name of ["plain", "norm"]) {
      for (let i = 0; i < n; i++) data.push(probes.map((p) => (p.grad_norm[name][i] > 0 ? p.grad_norm[name][i] : null)));
    }
    gradChart.setData(data);
  }
  function drawHeat(canvas, label, hists, missing = "") {
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const cols = hists.filter((h) => h);
    if (!cols.length) { label.textContent = missing; return; }
    const bins = cols[0].hist.length;
    const off = canvas.offscreen || (canvas.offscreen = document.createElement("canvas")); // one per chart
    off.width = cols.length; off.height = bins;
    const img = off.getContext("2d").createImageData(cols.length, bins);
    cols.forEach((h, x) => {
      const peak = Math.max(...h.hist) || 1;
      h.hist.forEach((v, b) => {
        const t = Math.sqrt(v / peak); // sqrt: the tails stay visible next to a tall peak
        const i = ((bins - 1 - b) * cols.length + x) * 4;
        img.data[i] = 255 - t * 218; img.data[i + 1] = 255 - t * 156; img.data[i + 2] = 255 - t * 20; img.data[i + 3] = 255;
      });
    });
    off.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "rgba(0,0,0,0.25)";
    ctx.beginPath(); ctx.moveTo(0, canvas.height / 2); ctx.lineTo(canvas.width, canvas.height / 2); ctx.stroke();
    const r = cols[cols.length - 1].range;
    label.textContent = `vertical axis −${fmt(r)} … ${fmt(r)} (line at 0); steps ${probesSpan()}`;
  }
  function probesSpan() {
    const p = train.probes;
    return p.length ? `${p[0].step}–${p[p.length - 1].step}` : "";
  }
  $("t-layer").addEventListener("change", (e) => { trainLayer = Number(e.target.value); newProbe = true; redrawTraining(); });

  // -- views 1, 3, 4: requests and replies -----------------------------------------------------
  function requestView(view, params, t0 = performance.now()) {
    const id = ++viewId;
    pending.set(id, t0);
    send({ type: "view", view, id, params });
  }
  function onView(m) {
    const t0 = pending.get(m.id);
    for (const id of pending.keys()) if (id <= m.id) pending.delete(id); // older requests were merged into this one
    ({ bn_step: drawStep, train_vs_eval: drawModes, landscape: drawLandscape })[m.view](m.data);
    stats.views[m.view] = (stats.views[m.view] || 0) + 1;
    if (t0 !== undefined && m.view === "bn_step") stats.latencies.push(performance.now() - t0);
  }
  function requestActiveView() {
    if (activeTab === "step") requestStep();
    else if (activeTab === "modes") requestModes();
    else if (activeTab === "land") requestLandscape();
    else if (activeTab === "results") loadResults();
  }

  // -- view 1: BN step by step -----------------------------------------------------------------
  const stepInputs = ["batch_size", "gamma", "beta", "eps", "mean", "spread", "skew", "outliers", "layer", "unit"];
  let stepSeed = 0;
  let lastStep = null;
  let hX, hXhat, hY;
  function stepParams() {
    const p = { source: $("b-source").value, seed: stepSeed };
    for (const k of stepInputs) {
      const el = $(`b-${k}`);
      p[k] = el.dataset.log ? Number((10 ** Number(el.value)).toPrecision(3)) : Number(el.value);
    }
    return p;
  }
  function requestStep(t0) { requestView("bn_step", stepParams(), t0); }
  for (const k of stepInputs) {
    const el = $(`b-${k}`);
    const out = document.querySelector(`output[for="b-${k}"]`);
    const shown = (v) => (k === "layer" ? v + 1 : v); // layers are counted from 1 on the page
    const show = () => { out.textContent = fmt(shown(el.dataset.log ? 10 ** Number(el.value) : Number(el.value))); };
    show();
    el.addEventListener("input", (e) => { show(); requestStep(e.timeStamp || performance.now()); });
  }
  $("b-source").addEventListener("change", () => {
    const live = $("b-source").value === "live";
    document.querySelector("#view-step .synthetic").hidden = live;
    document.querySelector("#view-step .live").hidden = !live;
    requestStep();
  });
  $("b-resample").addEventListener("click", () => { stepSeed += 1; requestStep(); });
  $("b-recover").addEventListener("click", () => {
    if (!lastStep) return;
    for (const k of ["gamma", "beta"]) {
      const el = $(`b-${k}`), v = lastStep.identity[k];
      const reach = Math.min(100, Math.max(5, Math.ceil(Math.abs(v)))); // a wide batch needs a wider slider
      el.min = -reach; el.max = reach;
      el.value = v;
      el.dispatchEvent(new Event("input"));
    }
  });
  function histChart(el, color) {
    return makeChart(el, [{ label: "count", stroke: color, fill: `${color}55`, width: 1,
      paths: uPlot.paths.bars({ size: [0.95, 60] }), points: { show: false } }], { x: "value", height: 170 });
  }
  function drawStep(d) {
    lastStep = d;
    if (!hX) {
      hX = histChart($("h-x"), "#6b7280"); hXhat = histChart($("h-xhat"), "#7c3aed"); hY = histChart($("h-y"), COLORS.norm);
    }
    const centers = (h) => h.edges.slice(0, -1).map((e, i) => (e + h.edges[i + 1]) / 2);
    for (const [u, h] of [[hX, d.hist.x], [hXhat, d.hist.x_hat], [hY, d.hist.y]]) u.setData([centers(h), h.counts]);
    const recovered = Math.abs(d.gamma - d.identity.gamma) < 0.03 && Math.abs(d.beta - d.identity.beta) < 0.03;
    $("b-numbers").innerHTML = `
      <p><b>source</b>: ${d.source}, m = ${d.n} values</p>
      <p>μ<sub>B</sub> = ${fmt(d.mean, 4)} · σ²<sub>B</sub> = ${fmt(d.var, 4)} · σ<sub>B</sub> = ${fmt(d.std, 4)}</p>
      <p>1/√(σ²<sub>B</sub> + ε) = ${fmt(d.inv_std, 4)}</p>
      <p>x̂: mean ${fmt(d.x_hat_mean)}, std ${fmt(d.x_hat_std)} · y: mean ${fmt(d.y_mean)}, std ${fmt(d.y_std)}
        (= |γ|·std(x̂) and β)</p>
      <p>Identity: γ = √(σ²<sub>B</sub>+ε) = ${fmt(d.identity.gamma, 4)}, β = μ<sub>B</sub> = ${fmt(d.identity.beta, 4)}
        gives back x to within ${fmt(d.identity.max_abs_error, 2)}${recovered ? " ← the sliders are (about) there" : ""}.</p>`;
    const rows = [["x", d.examples.x], ["x − μ", d.examples.centered], ["x̂", d.examples.x_hat], ["y = γx̂ + β", d.examples.y]];
    $("b-examples").innerHTML = "<caption>Five values of the batch, step by step</caption>" +
      rows.map(([name, vs]) => `<tr><th scope="row">${name}</th>${vs.map((v) => `<td>${fmt(v, 4)}</td>`).join("")}</tr>`).join("");
  }

  // -- view 3: train vs inference --------------------------------------------------------------
  let meanChart, varChart, modesChart;
  function requestModes() { requestView("train_vs_eval", { layer: Number($("m-layer").value) }); }
  $("m-measure").addEventListener("click", requestModes);
  $("m-layer").addEventListener("change", requestModes);
  setInterval(() => { if (activeTab === "modes" && state === "running") requestModes(); }, 2000);
  function drawModes(d) {
    if (!meanChart) {
      meanChart = makeChart($("c-mean"), [dots("batch", COLORS.norm), dots("running", "#111827")], { x: "channel" });
      varChart = makeChart($("c-var"), [dots("batch", COLORS.norm), dots("running", "#111827")], { x: "channel" });
      modesChart = makeChart($("c-modes"), [
        line("with, train mode", COLORS.norm, { points: { show: true } }), line("with, eval mode", COLORS.norm, { dash: [5, 4] }),
        line("without", COLORS.plain, { dash: [2, 3] })], { x: "batch size", xScale: { distr: 3, log: 2 }, yScale: { range: [0, 1] } });
    }
    if (!d.available) {
      $("m-info").textContent = d.reason;
      for (const u of [meanChart, varChart]) u.setData([[], [], []]);
      modesChart.setData([[], [], [], []]);
      return;
    }
    fillOptions($("m-layer"), d.layers, d.layer);
    $("m-info").textContent = `step ${d.step}; batch statistics of ${d.batch_examples} training images in train mode; ` +
      `variance: biased (what normalizes); running variance: as the layer keeps it (unbiased, torch convention); ` +
      `accuracy on ${d.examples} test images.`;
    const ch = [...Array(d.channels).keys()];
    meanChart.setData([ch, d.batch_mean, d.running_mean]);
    varChart.setData([ch, d.batch_var, d.running_var]);
    modesChart.setData([d.batch_sizes, d.train_mode_acc, d.batch_sizes.map(() => d.eval_mode_acc),
      d.batch_sizes.map(() => d.plain_acc)]);
  }

  // -- view 4: loss landscape ------------------------------------------------------------------
  function requestLandscape() {
    $("l-info").textContent = "computing…";
    requestView("landscape", { radius: Number($("l-radius").value), points: Number($("l-points").value), seed: 0 });
  }
  for (const k of ["radius", "points"]) {
    const el = $(`l-${k}`);
    const out = document.querySelector(`output[for="l-${k}"]`);
    out.textContent = el.value;
    el.addEventListener("input", () => { out.textContent = el.value; });
    el.addEventListener("change", requestLandscape);
  }
  $("l-compute").addEventListener("click", requestLandscape);
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function colormap(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
  }
  function drawLandscape(d) {
    const logs = {};
    let lo = Infinity, hi = -Infinity;
    for (const name of ["plain", "norm"]) {
      logs[name] = d.nets[name].loss.map((row) => row.map((v) => (v === null ? null : Math.log(Math.max(v, 1e-8)))));
      for (const row of logs[name]) for (const v of row) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    for (const name of ["plain", "norm"]) drawSurface($(`l-${name}`), logs[name], d.nets[name].path, d.radius, lo, hi);
    const reach = (name) => Math.max(0, ...d.nets[name].path.flatMap(([a, b]) => [Math.abs(a), Math.abs(b)]));
    const span = (name) => d.nets[name].path.length > 1 ? `${fmt(reach(name), 2)} over the last ${d.step - d.nets[name].path[0][2]} steps` : "none yet";
    $("l-info").textContent = `step ${d.step}; both use one colour scale: loss ${fmt(Math.exp(lo))} (dark) to ${fmt(Math.exp(hi))} (light). ` +
      `Path reach: without ${span("plain")}, with ${span("norm")} (a radius near it shows the path).`;
  }
  function drawSurface(canvas, grid, path, radius, lo, hi) {
    const n = grid.length, W = canvas.width, H = canvas.height;
    const ctx = canvas.getContext("2d");
    const off = document.createElement("canvas");
    off.width = n; off.height = n;
    const img = off.getContext("2d").createImageData(n, n);
    const norm = (v) => (v === null ? 1 : (v - lo) / (hi - lo || 1));
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        const [r, g, b] = colormap(norm(grid[i][j]));
        const k = ((n - 1 - j) * n + i) * 4; // i along the first direction (x), j along the second (y, up)
        img.data[k] = r; img.data[k + 1] = g; img.data[k + 2] = b; img.data[k + 3] = 255;
      }
    }
    off.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(off, 0, 0, W, H);
    // contour lines of log loss at 12 levels (marching squares, one segment per crossing pair)
    const px = (i) => ((i + 0.5) / n) * W, py = (j) => H - ((j + 0.5) / n) * H;
    ctx.strokeStyle = "rgba(255,255,255,0.45)";
    ctx.lineWidth = 1;
    for (let level = 1; level < 12; level++) {
      const c = lo + ((hi - lo) * level) / 12;
      ctx.beginPath();
      for (let i = 0; i < n - 1; i++) {
        for (let j = 0; j < n - 1; j++) {
          const corners = [[i, j], [i + 1, j], [i + 1, j + 1], [i, j + 1]];
          const vals = corners.map(([a, b]) => grid[a][b]);
          if (vals.some((v) => v === null)) continue;
          const cuts = [];
          for (let e = 0; e < 4; e++) {
            const v0 = vals[e], v1 = vals[(e + 1) % 4];
            if ((v0 < c) !== (v1 < c)) {
              const t = (c - v0) / (v1 - v0);
              const [a0, b0] = corners[e], [a1, b1] = corners[(e + 1) % 4];
              cuts.push([px(a0 + t * (a1 - a0)), py(b0 + t * (b1 - b0))]);
            }
          }
          for (let s = 0; s + 1 < cuts.length; s += 2) { ctx.moveTo(...cuts[s]); ctx.lineTo(...cuts[s + 1]); }
        }
      }
      ctx.stroke();
    }
    // the optimizer's recent path, in the plane's coordinates (radius maps to the edge)
    const cx = (a) => W / 2 + (a / radius) * (W / 2) * ((n - 1) / n), cy = (b) => H / 2 - (b / radius) * (H / 2) * ((n - 1) / n);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 2;
    ctx.beginPath();
    path.forEach(([a, b], k) => (k ? ctx.lineTo(cx(a), cy(b)) : ctx.moveTo(cx(a), cy(b))));
    ctx.stroke();
    ctx.fillStyle = "#fff";
    for (const [a, b] of path) { ctx.beginPath(); ctx.arc(cx(a), cy(b), 2, 0, 2 * Math.PI); ctx.fill(); }
    ctx.fillStyle = "#ef4444";
    ctx.beginPath(); ctx.arc(W / 2, H / 2, 4, 0, 2 * Math.PI); ctx.fill();
  }

  // -- view 5: results -------------------------------------------------------------------------
  let runChart = null;
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  async function loadResults() {
    try {
      const [claims, runs] = await Promise.all([fetch("/api/claims").then((r) => r.json()), fetch("/api/runs").then((r) => r.json())]);
      const ctb = $("r-claims").tBodies[0];
      ctb.innerHTML = claims.claims.map((c, i) => `<tr tabindex="0" data-i="${i}"><td>${c.number}</td><td>${esc(c.title)}</td>
        <td class="verdict ${esc((c.verdict || "").replace(" ", "-"))}">${esc(c.verdict || "not run yet")}</td><td>${esc(c.protocol || "–")}</td></tr>`).join("");
      selectable(ctb, (i) => showClaim(claims.claims[i]));
      const rtb = $("r-runs").tBodies[0];
      const rows = runs.runs.slice(-200).reverse();
      rtb.innerHTML = rows.length ? rows.map((r, i) => `<tr tabindex="0" data-i="${i}"><td><code>${esc(r.id)}</code></td><td>${esc(r.label)}</td>
        <td>${r.seed}</td><td>${esc(r.status)}</td><td>${r.steps}/${r.total_steps}</td><td>${fmt(r.final_test_acc, 4)}</td></tr>`).join("")
        : `<tr><td colspan="6">No runs stored yet: try <code>make demo</code> or <code>bnlab compare</code>.</td></tr>`;
      selectable(rtb, (i) => showRun(rows[i].id));
    } catch (err) {
      showError(`could not load results: ${err}`);
    }
  }
  function selectable(tbody, onSelect) {
    for (const tr of tbody.rows) {
      if (tr.dataset.i === undefined) continue;
      const pick = () => {
        for (const other of tbody.rows) other.removeAttribute("aria-selected");
        tr.setAttribute("aria-selected", "true");
        onSelect(Number(tr.dataset.i));
      };
      tr.addEventListener("click", pick);
      tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); pick(); } });
    }
  }
  function showClaim(c) {
    const plots = [...Array(c.plots).keys()].map((i) => `<img alt="plot ${i + 1} of ${esc(c.name)}" src="/api/claims/${encodeURIComponent(c.name)}/plots/${i}">`).join("");
    $("r-claim").innerHTML = `<h3>${c.number}. ${esc(c.title)}</h3><p><i>What the seeds say:</i> ${esc(c.seed_wording)}</p>
      <p><i>Verdict rule (fixed before running):</i> ${esc(c.rule)}</p><p><i>Published anchor:</i> ${esc(c.anchor)}</p>
      ${c.verdict ? `<p><b>Verdict: ${esc(c.verdict)}</b> (${esc(c.protocol)}, ${c.seeds} seeds), because ${esc(c.reason)}.</p>
      <p><i>Statistic:</i> ${esc(c.statistic)}</p>` : `<p>Not run yet: <code>bnlab claims run ${esc(c.name)}</code></p>`}${plots}`;
  }
  async function showRun(id) {
    const r = await fetch(`/api/runs/${encodeURIComponent(id)}`).then((x) => x.json());
    if (!runChart) runChart = makeChart($("c-run"), [line("test accuracy", COLORS.norm), line("train loss", COLORS.plain)]);
    const acc = r.series.test_acc || { steps: [], values: [] };
    const loss = r.series.train_loss || { steps: [], values: [] };
    const steps = [...new Set([...acc.steps, ...loss.steps])].sort((a, b) => a - b);
    const at = (s, series) => { const m = new Map(series.steps.map((x, i) => [x, series.values[i]])); return steps.map((x) => m.get(x) ?? null); };
    runChart.setData([steps, at(steps, acc), at(steps, loss)]);
  }

  // -- tabs ------------------------------------------------------------------------------------
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  function selectTab(tab, focus = false) {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    activeTab = tab.id.slice(4);
    document.querySelector(".layout").classList.toggle("wide", activeTab === "step" || activeTab === "results");
    requestAnimationFrame(() => {
      resizeCharts();
      if (activeTab === "train") { newProbe = true; redrawTraining(); }
      requestActiveView();
    });
  }
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) selectTab(tabs[(i + step + tabs.length) % tabs.length], true);
    });
  });

  initTrainCharts();
  connect();
})();
