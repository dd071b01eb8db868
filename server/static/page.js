// The live page of an inversion-monitor server: polls api/runs and
// api/runs/<run> and draws the selected run with uPlot. No build step.
// Everything from the server is shown with textContent (run names come
// from clients), never parsed as HTML.
"use strict";

(() => {
  const REFRESH_MS = 2000;
  const HISTORY = 2000; // records per chart, at most the server's X-Max-History
  const TOKEN_KEY = "inversion-monitor-token";
  // x-axis tick spacings: whole steps only
  const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2500, 5e3,
    1e4, 2e4, 25e3, 5e4, 1e5, 2e5, 25e4, 5e5, 1e6, 2e6, 5e6, 1e7];

  // Exposed for the tests and the browser console; the page only reads it.
  const state = {
    token: null,
    runs: [],
    selected: null,
    detail: null,
    charts: {},
    refreshes: 0,
    error: null,
    maxHistory: null,
  };
  window.inversionMonitorPage = state;

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ formatting

  const isNum = (x) => typeof x === "number" && Number.isFinite(x);
  const num = (x) => (x === undefined || x === null || x === "" ? null : Number(x));
  const fixed = (x, digits) => (isNum(x) ? x.toFixed(digits) : "–");
  const signed = (x, digits) => (isNum(x) ? (x >= 0 ? "+" : "") + x.toFixed(digits) : "–");

  function age(unixSeconds) {
    if (!unixSeconds) return "–";
    const s = Math.max(0, Date.now() / 1000 - unixSeconds);
    if (s >= 86400) return `${Math.round(s / 86400)}d ago`;
    if (s >= 3600) return `${Math.round(s / 3600)}h ago`;
    if (s >= 60) return `${Math.round(s / 60)}m ago`;
    return `${Math.round(s)}s ago`;
  }

  // Where each quantity lives in a record or summary (protobuf JSON, proto
  // field names). A run without RL signals (reward, policy entropy,
  // covariance) or without a kind simply shows no such chart and no kind.
  const field = {
    kind: (summary) => summary.run?.kind || "",
    rho: (rec) => num(rec.inversion?.spearman?.value),
    ciLow: (rec) => num(rec.inversion?.spearman?.ci_low),
    ciHigh: (rec) => num(rec.inversion?.spearman?.ci_high),
    confidence: (rec) => num(rec.inversion?.confidence),
    entropy: (rec, q) => num(rec.entropy?.[q]),
    rewardMean: (rec) => num(rec.reward_mean),
    rewardStd: (rec) => num(rec.reward_std),
    policyEntropy: (rec, q) => num(q === "mean"
      ? rec.policy_entropy_mean ?? rec.policy_entropy?.mean : rec.policy_entropy?.[q]),
    covariance: (rec) => num(rec.entropy_covariance),
    loss: (rec) => num(rec.loss),
    gradNorm: (rec) => num(rec.grad_norm),
    kl: (rec) => num(rec.kl),
    length: (rec) => num(rec.completion_length_mean),
  };

  // ------------------------------------------------------------ token and URL

  function readFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const token = params.get("token");
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      params.delete("token"); // keep it out of the address bar and screenshots
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    }
    state.token = sessionStorage.getItem(TOKEN_KEY);
    state.selected = params.get("run") || state.selected;
  }

  function selectRun(runId) {
    state.selected = runId;
    history.replaceState(null, "", location.pathname + location.search + "#run=" + encodeURIComponent(runId));
    refresh();
  }

  class AuthError extends Error {}

  async function getJson(path) {
    const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
    const response = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    const maxHistory = Number(response.headers.get("X-Max-History"));
    if (maxHistory > 0) state.maxHistory = maxHistory;
    if (response.status === 401) throw new AuthError(body?.error?.message || "token needed");
    if (!response.ok) {
      throw new Error(body?.error?.message || `${path}: HTTP ${response.status}`);
    }
    return body;
  }

  function showTokenForm(message) {
    const form = $("token-form");
    form.hidden = false;
    const error = $("token-error");
    error.hidden = !state.token;
    error.textContent = state.token ? "The server did not accept that token: " + message : "";
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    state.token = value;
    $("token-input").value = "";
    refresh();
  });

  // ------------------------------------------------------------ runs table

  function cell(row, name, text, className) {
    const td = document.createElement("td");
    td.dataset.field = name;
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function renderRuns() {
    const body = $("runs").tBodies[0];
    const rows = [];
    for (const summary of state.runs) {
      const runId = summary.run.run_id;
      const latest = summary.latest && summary.records !== "0" ? summary.latest : null;
      const tr = document.createElement("tr");
      tr.dataset.runId = runId;
      tr.tabIndex = 0;
      if (runId === state.selected) tr.className = "selected";
      cell(tr, "name", summary.display_name || runId);
      cell(tr, "project", summary.run.project || "–");
      cell(tr, "kind", field.kind(summary) || "–");
      cell(tr, "status", summary.status, "status-" + summary.status);
      cell(tr, "step", latest ? String(latest.step) : "–", "num");
      cell(tr, "rho", latest ? signed(field.rho(latest), 3) : "–", "num");
      cell(tr, "ci", latest && isNum(field.ciLow(latest))
        ? `[${signed(field.ciLow(latest), 2)}, ${signed(field.ciHigh(latest), 2)}]` : "–");
      cell(tr, "entropy", latest ? fixed(field.entropy(latest, "mean"), 3) : "–", "num");
      cell(tr, "records", String(summary.records), "num");
      cell(tr, "updated", age(summary.last_update_time));
      const alerts = cell(tr, "alerts", "");
      for (const alert of summary.active_alerts) {
        const badge = document.createElement("span");
        badge.className = "alert " + alert.severity;
        badge.textContent = alert.name;
        badge.title = alert.summary;
        alerts.appendChild(badge);
      }
      if (!summary.active_alerts.length) alerts.textContent = "–";
      tr.addEventListener("click", () => selectRun(runId));
      tr.addEventListener("keydown", (e) => { if (e.key === "Enter") selectRun(runId); });
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    $("no-runs").hidden = state.runs.length > 0;
  }

  // ------------------------------------------------------------ one run

  // One record per step (the lowest rank's), oldest first.
  function byStep(history) {
    const seen = new Map();
    for (const rec of history) {
      const step = Number(rec.step);
      const kept = seen.get(step);
      if (!kept || rec.rank < kept.rank) seen.set(step, rec);
    }
    return [...seen.entries()].sort((a, b) => a[0] - b[0]).map(([, rec]) => rec);
  }

  const COLORS = {
    rho: "#1f5fbf", band: "rgba(31, 95, 191, 0.15)",
    mean: "#b3261e", p50: "#6b3fa0", quant: "rgba(107, 63, 160, 0.45)", qband: "rgba(107, 63, 160, 0.10)",
    reward: "#1b7f3b", rband: "rgba(27, 127, 59, 0.15)", cov: "#a05a00", loss: "#555",
    grad: "#7a3b00", kl: "#00607a", length: "#4a4a8a",
  };

  // Chart definitions: which appear, their series and their data.
  function chartSpecs(records) {
    const has = (f) => records.some((r) => isNum(f(r)));
    const col = (f) => records.map((r) => { const v = f(r); return isNum(v) ? v : null; });
    const specs = [];
    const conf = records.map(field.confidence).find(isNum);
    specs.push({
      key: "rho",
      title: `rho: Spearman(entropy, gradient strength) with its ${conf ? Math.round(conf * 100) + "% " : ""}CI`,
      range: [-1, 1],
      series: [
        { label: "rho", stroke: COLORS.rho, width: 2 },
        { label: "CI high", stroke: COLORS.band, width: 1 },
        { label: "CI low", stroke: COLORS.band, width: 1 },
      ],
      bands: [{ series: [2, 3], fill: COLORS.band }],
      columns: [col(field.rho), col(field.ciHigh), col(field.ciLow)],
    });
    specs.push({
      key: "entropy",
      title: "token entropy (nats): mean, p10 / p50 / p90",
      series: [
        { label: "mean", stroke: COLORS.mean, width: 2 },
        { label: "p90", stroke: COLORS.quant, width: 1 },
        { label: "p50", stroke: COLORS.p50, width: 1, dash: [4, 3] },
        { label: "p10", stroke: COLORS.quant, width: 1 },
      ],
      bands: [{ series: [2, 4], fill: COLORS.qband }],
      columns: ["mean", "p90", "p50", "p10"].map((q) => col((r) => field.entropy(r, q))),
    });
    if (has(field.rewardMean)) {
      const std = has(field.rewardStd);
      const mean = col(field.rewardMean);
      const sd = col(field.rewardStd);
      const hi = mean.map((m, i) => (m !== null && sd[i] !== null ? m + sd[i] : null));
      const lo = mean.map((m, i) => (m !== null && sd[i] !== null ? m - sd[i] : null));
      specs.push({
        key: "reward",
        title: std ? "reward: mean ± std" : "reward: mean",
        series: [{ label: "reward", stroke: COLORS.reward, width: 2 },
          ...(std ? [{ label: "+std", stroke: COLORS.rband }, { label: "-std", stroke: COLORS.rband }] : [])],
        bands: std ? [{ series: [2, 3], fill: COLORS.rband }] : [],
        columns: std ? [mean, hi, lo] : [mean],
      });
    }
    if (has((r) => field.policyEntropy(r, "mean"))) {
      const quantiles = has((r) => field.policyEntropy(r, "p10"));
      const qs = quantiles ? ["mean", "p90", "p50", "p10"] : ["mean"];
      specs.push({
        key: "policy-entropy",
        title: "policy entropy over completion tokens (nats)" + (quantiles ? ": mean, p10 / p50 / p90" : ""),
        series: [
          { label: "mean", stroke: COLORS.mean, width: 2 },
          ...(quantiles ? [
            { label: "p90", stroke: COLORS.quant, width: 1 },
            { label: "p50", stroke: COLORS.p50, width: 1, dash: [4, 3] },
            { label: "p10", stroke: COLORS.quant, width: 1 },
          ] : []),
        ],
        bands: quantiles ? [{ series: [2, 4], fill: COLORS.qband }] : [],
        columns: qs.map((q) => col((r) => field.policyEntropy(r, q))),
      });
    }
    if (has(field.covariance)) {
      specs.push({
        key: "covariance",
        title: "entropy covariance Cov(log π, A)",
        series: [{ label: "covariance", stroke: COLORS.cov, width: 2 }],
        columns: [col(field.covariance)],
      });
    }
    if (has(field.loss)) {
      specs.push({
        key: "loss",
        title: "training loss",
        series: [{ label: "loss", stroke: COLORS.loss, width: 1.5 }],
        columns: [col(field.loss)],
      });
    }
    // training health of every optimizer step (alert starts are marked on every chart)
    for (const [key, title, f, color] of [
      ["grad-norm", "gradient norm (before clipping)", field.gradNorm, COLORS.grad],
      ["kl", "KL to the reference policy (nats)", field.kl, COLORS.kl],
      ["length", "mean completion length (tokens)", field.length, COLORS.length],
    ]) {
      if (!has(f)) continue;
      specs.push({
        key, title,
        series: [{ label: key, stroke: color, width: 1.5 }],
        columns: [col(f)],
      });
    }
    return specs;
  }

  function chartWidth() {
    return Math.max(320, Math.min(1100, $("charts").clientWidth || 800));
  }

  // Vertical lines at the steps where alerts started.
  function alertMarks(u) {
    const alerts = state.detail?.alerts || [];
    const ctx = u.ctx;
    ctx.save();
    ctx.lineWidth = 1.5 * devicePixelRatio;
    for (const alert of alerts) {
      const x = u.valToPos(Number(alert.start_step), "x", true);
      if (!Number.isFinite(x) || x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
      ctx.strokeStyle = alert.severity === "critical" ? "#b3261e" : "#d08000";
      ctx.setLineDash([5 * devicePixelRatio, 4 * devicePixelRatio]);
      ctx.beginPath();
      ctx.moveTo(x, u.bbox.top);
      ctx.lineTo(x, u.bbox.top + u.bbox.height);
      ctx.stroke();
    }
    ctx.restore();
  }

  function makeChart(spec, data) {
    const box = document.createElement("figure");
    box.className = "chart";
    box.dataset.chart = spec.key;
    const caption = document.createElement("figcaption");
    caption.textContent = spec.title;
    box.appendChild(caption);
    $("charts").appendChild(box);
    const opts = {
      width: chartWidth(),
      height: 200,
      scales: { x: { time: false }, y: spec.range ? { range: spec.range } : {} },
      axes: [{ incrs: STEP_INCREMENTS }, {}],
      series: [{ label: "step" }, ...spec.series.map((s) => ({ spanGaps: false, points: { show: false }, ...s }))],
      bands: spec.bands || [],
      legend: { live: true },
      hooks: { draw: [alertMarks] },
    };
    const plot = new uPlot(opts, data, box);
    return { plot, box, shape: spec.series.map((s) => s.label).join("|") };
  }

  function renderCharts(records) {
    const specs = chartSpecs(records);
    const steps = records.map((r) => Number(r.step));
    const wanted = new Set(specs.map((s) => s.key));
    for (const [key, chart] of Object.entries(state.charts)) {
      if (!wanted.has(key) || chart.runId !== state.selected) {
        chart.plot.destroy();
        chart.box.remove();
        delete state.charts[key];
      }
    }
    for (const spec of specs) {
      const data = [steps, ...spec.columns];
      const chart = state.charts[spec.key];
      const shape = spec.series.map((s) => s.label).join("|");
      if (chart && chart.shape === shape) {
        chart.plot.setData(data);
      } else {
        if (chart) { chart.plot.destroy(); chart.box.remove(); }
        state.charts[spec.key] = { ...makeChart(spec, data), runId: state.selected };
      }
    }
    // keep the charts in spec order
    for (const spec of specs) $("charts").appendChild(state.charts[spec.key].box);
  }

  function renderRun() {
    const detail = state.detail;
    $("run-section").hidden = !detail;
    if (!detail) return;
    const summary = detail.summary;
    const run = summary.run;
    $("run-title").textContent = summary.display_name || run.run_id;
    const kind = field.kind(summary);
    const parts = [
      `status ${summary.status}`,
      kind ? `kind ${kind}` : null,
      run.project ? `project ${run.project}` : null,
      run.framework ? `framework ${run.framework}` : null,
      run.model_type ? `model ${run.model_type}` : null,
      `${run.world_size} rank${run.world_size === 1 ? "" : "s"}`,
      `${summary.records} records`,
      `run id ${run.run_id}`,
    ];
    $("run-meta").textContent = parts.filter(Boolean).join(" · ");
    const items = detail.alerts.map((alert) => {
      const li = document.createElement("li");
      li.className = "alert-line " + alert.severity + (alert.active ? " active" : "");
      const when = alert.active
        ? `since step ${alert.start_step}`
        : `steps ${alert.start_step}–${alert.end_step}, resolved`;
      li.textContent = `${alert.name} (${alert.severity}) ${when}: ${alert.summary}`
        + " (dashed line on the charts)";
      return li;
    });
    $("run-alerts").replaceChildren(...items);
    renderCharts(byStep(detail.history));
  }

  // ------------------------------------------------------------ history cache

  // The selected run's records, kept between refreshes so that a refresh
  // fetches only what arrived since (the server sends the records with the
  // highest steps). A full fetch when the run changes, when the count does
  // not add up, and every FULL_EVERY refreshes (records that arrive late with
  // lower steps than the newest ones).
  const FULL_EVERY = 15;
  const cache = { runId: null, records: new Map(), seen: 0, fetches: 0 };

  async function loadRun(listed) {
    const runId = listed.run.run_id;
    const total = Number(listed.records); // all stored before the GetRun below
    const limit = Math.min(HISTORY, state.maxHistory || HISTORY);
    const full = cache.runId !== runId || total < cache.seen || cache.fetches % FULL_EVERY === 0;
    if (cache.runId !== runId) cache.fetches = 0;
    const want = full ? limit : Math.max(1, Math.min(limit, total - cache.seen + 10));
    const detail = await getJson(`api/runs/${encodeURIComponent(runId)}?history=${want}&samples=0`);
    if (full) cache.records = new Map();
    for (const rec of detail.history) cache.records.set(`${rec.rank}/${rec.sequence}`, rec);
    let records = [...cache.records.values()].sort(
      (a, b) => Number(a.step) - Number(b.step) || a.rank - b.rank || Number(a.sequence) - Number(b.sequence));
    if (records.length > limit) records = records.slice(records.length - limit);
    if (!full && records.length < Math.min(limit, total)) {
      cache.runId = null; // missed some: fetch everything
      return loadRun(listed);
    }
    cache.records = new Map(records.map((rec) => [`${rec.rank}/${rec.sequence}`, rec]));
    cache.runId = runId;
    cache.seen = total;
    cache.fetches += 1;
    return { ...detail, history: records };
  }

  // ------------------------------------------------------------ refresh loop

  let timer = null;
  let running = false;
  let again = false; // asked for while a refresh was running: do one more at once

  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    clearTimeout(timer);
    if (document.hidden) { // a background tab asks again when shown
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    running = true;
    try {
      const list = await getJson("api/runs");
      state.runs = list.runs;
      $("token-form").hidden = true;
      if (!state.runs.some((s) => s.run.run_id === state.selected)) {
        state.selected = state.runs.length ? state.runs[0].run.run_id : null;
      }
      renderRuns();
      const listed = state.runs.find((s) => s.run.run_id === state.selected);
      state.detail = listed ? await loadRun(listed) : null;
      renderRun();
      state.error = null;
      state.refreshes += 1;
      const n = state.runs.length;
      $("status").textContent = `${n} run${n === 1 ? "" : "s"} · updated ${new Date().toLocaleTimeString()}`;
      $("status").className = "";
    } catch (err) {
      state.error = String(err.message || err);
      if (err instanceof AuthError) showTokenForm(err.message);
      $("status").textContent = err instanceof AuthError ? "token needed" : "cannot reach the server: " + state.error;
      $("status").className = "error";
    } finally {
      running = false;
      timer = setTimeout(refresh, again ? 0 : REFRESH_MS);
      again = false;
    }
  }

  window.addEventListener("hashchange", () => { readFragment(); refresh(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  window.addEventListener("resize", () => {
    for (const chart of Object.values(state.charts)) chart.plot.setSize({ width: chartWidth(), height: 200 });
  });
  readFragment();
  refresh();
})();
