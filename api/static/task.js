// One task: what leave-one-out said (method, hyper-parameters, per-class accuracy, confusion matrix),
// classify with evidence, and one-click corrections that add the image as a shot of the right class.

import { ApiError, request, thumbnailURL, upload, waitForTask } from "./api.js";
import { $, dropTarget, el, looksLikeImage, percent, showError } from "./dom.js";

const EVIDENCE = 3;
const BUTTONS_UP_TO = 12;
const MATRIX_UP_TO = 25; // classes; beyond, the confusion matrix is listed as its largest off-diagonal cells // more classes than this: a select and one button instead of a button per class
let current = null; // the task shown

const taskPath = (id, tail = "") => `/v1/tasks/${encodeURIComponent(id)}${tail}`;

function fmt(value) {
  return typeof value === "number" ? String(Number(value.toPrecision(3))) : String(value);
}

function renderFacts(task) {
  const facts = $("#task-facts");
  const shots = task.classes.reduce((n, c) => n + c.shots, 0);
  // An ensemble (what `auto` serves from a few shots per class on) names the methods whose answers it averages.
  const members = (task.methods[task.method] || {}).members || [];
  const method = members.length ? `${task.method} of ${members.join(" + ")}` : task.method;
  const hyper = Object.entries(task.hyperparams).map(([k, v]) => `${k} = ${fmt(v)}`).join(", ") || "none";
  const rows = [
    ["Method", task.method_requested && task.method_requested !== task.method ? `${method} (asked: ${task.method_requested})` : method],
    ["Hyper-parameters", hyper],
    ["Leave-one-out accuracy", percent(task.loo_accuracy)],
    ["Classes", `${task.classes.length} classes, ${shots} shots`],
    ["Model", `${task.model} (${task.backend})`],
    ["Task id", task.id],
  ];
  facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
}

function renderPerClass(task) {
  const loo = task.loo || null;
  const table = $("#per-class");
  const head = el("tr", {}, el("th", { scope: "col", text: "Class" }), el("th", { scope: "col", text: "Shots" }),
    el("th", { scope: "col", text: "LOO accuracy" }));
  const body = task.classes.map((c, i) => {
    const row = loo ? loo.classes[i] : null;
    const acc = row ? row.accuracy : null;
    return el("tr", {}, el("th", { scope: "row", text: c.name }), el("td", { text: c.shots }),
      el("td", {}, el("span", { class: "bar-cell" }, el("span", { class: "bar", style: `width:${100 * (acc || 0)}%` })),
        el("span", { text: row ? `${percent(acc)} (${row.correct}/${row.scored})` : "–" })));
  });
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, body));
  const confusion = $("#confusion");
  $("#confusion-title").hidden = !loo;
  confusion.hidden = !loo;
  if (!loo) return;
  const names = task.classes.map((c) => c.name);
  if (names.length > MATRIX_UP_TO) {
    // Too many classes for a matrix on a screen: the most frequent confusions instead.
    $("#confusion-title").textContent = "Most frequent leave-one-out confusions";
    const off = loo.confusion.filter((c) => c.actual !== c.predicted).sort((a, b) => b.count - a.count).slice(0, 20);
    confusion.replaceChildren(el("thead", {}, el("tr", {}, ["true class", "predicted as", "shots"].map((t) => el("th", { scope: "col", text: t })))),
      el("tbody", {}, off.map((c) => el("tr", {}, el("td", { text: c.actual }), el("td", { text: c.predicted }), el("td", { text: c.count })))));
    return;
  }
  $("#confusion-title").textContent = "Confusion matrix";
  const index = new Map(names.map((n, i) => [n, i]));
  const counts = names.map(() => names.map(() => 0));
  for (const c of loo.confusion) counts[index.get(c.actual)][index.get(c.predicted)] = c.count;
  const header = el("tr", {}, el("th", { scope: "col", text: "true \\ predicted" }), names.map((n) => el("th", { scope: "col", text: n })));
  const rows = counts.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return el("tr", {}, el("th", { scope: "row", text: names[i] }), row.map((n, j) =>
      el("td", { class: i === j ? "diag" : n ? "off" : "", style: `--share:${n / total}`, title: `${names[i]} → ${names[j]}: ${n}`, text: n })));
  });
  confusion.replaceChildren(el("thead", {}, header), el("tbody", {}, rows));
}

// Why `auto` chose (task.selection): every cache method refitted on the same shot folds, best first. Each
// method's own leave-one-out figure is not comparable across methods; this ranking is.
const RULES = {
  blend: "It serves the mean of the two ranked first",
  best: "It serves the one ranked first (too few shots per class to blend)",
};

function renderSelection(task) {
  const selection = task.selection;
  const ranked = selection ? selection.ranking : [];
  $("#selection").hidden = !ranked.length;
  if (!ranked.length) return;
  const members = (task.methods[task.method] || {}).members || [];
  const serving = new Set(members.length ? members : [task.method]);
  $("#selection-note").textContent = `Every method refitted without each of ${selection.folds} shot folds and ` +
    `scored on the ${selection.scored_shots} held-out shots; ranked by calibrated cross-entropy, lowest first. ` +
    `${RULES[selection.rule] || ""}.`;
  const head = el("tr", {}, ["Method", "Held-out accuracy", "Cross-entropy", ""].map((t) => el("th", { scope: "col", text: t })));
  const rows = ranked.map((r) => el("tr", { class: serving.has(r.method) ? "serving" : "" },
    el("th", { scope: "row", text: r.method }), el("td", { text: percent(r.fold_accuracy) }),
    el("td", { text: r.fold_nll.toFixed(3) }), el("td", { text: serving.has(r.method) ? "serves" : "" })));
  $("#selection-ranking").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
}

function renderTask(task) {
  current = task;
  $("#task-title").textContent = task.name || task.id;
  $("#task-version").textContent = `version ${task.version}`;
  $("#task-building").hidden = true;
  $("#task-result").hidden = false;
  $("#classify-panel").hidden = false;
  renderFacts(task);
  renderPerClass(task);
  renderSelection(task);
  const asked = task.method_requested === "default" ? task.method : task.method_requested;
  if ([...$("#method-switch").options].some((o) => o.value === asked)) $("#method-switch").value = asked;
  showError($("#method-error"), null);
}

export async function showTask(taskId, known = null) {
  current = null;
  $("#task-title").textContent = "Task";
  $("#task-version").textContent = "";
  $("#task-result").hidden = true;
  $("#classify-panel").hidden = true;
  $("#classify-results").replaceChildren();
  $("#method-status").textContent = "tuned again on the stored shots; nothing is uploaded";
  showError($("#task-error"), null);
  showError($("#classify-error"), null);
  try {
    let task = known;
    if (!task) {
      const { status, body } = await request("GET", taskPath(taskId));
      if (status === 202) {
        $("#task-building").hidden = false;
        task = await waitForTask(taskId, (done, total) => {
          $("#task-build-bar").value = total ? done / total : 0;
          $("#task-build-text").textContent = `${done} of ${total} shots encoded`;
        });
      } else task = body;
    }
    renderTask(task);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    $("#task-building").hidden = true;
    showError($("#task-error"), err);
  }
}

// ---- classify --------------------------------------------------------------------------------------

function bars(result) {
  return el("ol", { class: "topk", "aria-label": "Most likely classes" }, result.top_k.map((p) =>
    el("li", {}, el("span", { class: "topk-label", text: p.label }),
      el("span", { class: "bar-cell" }, el("span", { class: "bar", style: `width:${100 * p.probability}%` })),
      el("span", { class: "topk-prob", text: percent(p.probability) }))));
}

function evidence(taskId, result) {
  if (!result.evidence || !result.evidence.length) return null;
  return el("div", { class: "evidence" }, el("h4", { text: "Nearest shots" }),
    el("ul", { class: "thumbs small" }, result.evidence.map((e) => {
      const img = el("img", { alt: `shot ${e.shot} of ${e.label}`, class: "evidence-thumb" });
      thumbnailURL(taskId, e.shot).then((url) => { img.src = url; }).catch(() => img.replaceWith(el("span", { class: "no-preview", text: "no thumbnail" })));
      return el("li", { class: "thumb" }, img, el("span", { class: "thumb-name", text: e.label }),
        el("span", { class: "muted", text: `cos ${e.similarity.toFixed(3)}` }));
    })));
}

async function correct(cardNode, file, label) {
  const status = $(".correction-status", cardNode);
  for (const b of cardNode.querySelectorAll(".correction button, .correction select")) b.disabled = true;
  status.textContent = `adding as a shot of ${label}…`;
  const form = new FormData();
  form.append("images", file, file.name);
  form.append("labels", label);
  try {
    const { body } = await upload(taskPath(current.id, "/shots"), form, () => {});
    renderTask(body);
    status.textContent = `Added as a shot of ${label}: the task re-tuned, now version ${body.version}.`;
    cardNode.classList.add("corrected");
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    status.textContent = err.message;
    status.classList.add("error");
    for (const b of cardNode.querySelectorAll(".correction button, .correction select")) b.disabled = false;
  }
}

function correction(cardNode, file, result) {
  const others = current.classes.map((c) => c.name).filter((n) => n !== result.label);
  const prompt = result.label === null ? "Which class is it?" : "Wrong? It is:";
  let controls;
  if (others.length <= BUTTONS_UP_TO) {
    controls = others.map((n) => el("button", { type: "button", class: "small-button", text: n, "aria-label": `Add this image as a shot of ${n}`, onclick: () => correct(cardNode, file, n) }));
  } else {
    const select = el("select", { "aria-label": "Right class" }, others.map((n) => el("option", { value: n, text: n })));
    controls = [select, el("button", { type: "button", text: "Add as shot", onclick: () => correct(cardNode, file, select.value) })];
  }
  return el("div", { class: "correction" }, el("span", { class: "muted", text: prompt }), controls,
    el("p", { class: "correction-status", "aria-live": "polite" }));
}

function resultCard(file) {
  const img = el("img", { alt: file.name, src: URL.createObjectURL(file) });
  return el("article", { class: "result-card" }, el("div", { class: "query" }, img),
    el("div", { class: "verdict" }, el("h4", { class: "filename", text: file.name }), el("p", { class: "pending muted", text: "classifying…" })));
}

function fillCard(cardNode, file, result) {
  const verdict = $(".verdict", cardNode);
  const label = result.label === null
    ? el("p", { class: "label abstained" }, el("strong", { text: "Not sure" }))
    : el("p", { class: "label" }, el("strong", { class: "predicted", text: result.label }));
  const parts = [$(".filename", verdict), label,
    result.reason ? el("p", { class: "reason", text: result.reason }) : null,
    bars(result), evidence(current.id, result), correction(cardNode, file, result)];
  verdict.replaceChildren(...parts.filter(Boolean));
}

// Sends the images; when the service refuses one by name, that card shows why and the rest are re-sent.
async function classifyFiles(files) {
  if (!current || !files.length) return;
  showError($("#classify-error"), null);
  const results = $("#classify-results");
  let pending = files.map((file) => ({ file, card: resultCard(file) }));
  results.prepend(...pending.map((p) => p.card));
  const topK = Math.max(1, Number($("#classify-topk").value) || 3);
  while (pending.length) {
    const form = new FormData();
    for (const p of pending) form.append("images", p.file, p.file.name);
    form.append("top_k", String(topK));
    form.append("abstain", $("#classify-abstain").checked ? "true" : "false");
    form.append("evidence", String(EVIDENCE));
    try {
      const { body } = await upload(taskPath(current.id, "/classify"), form, () => {});
      body.results.forEach((r, i) => fillCard(pending[i].card, pending[i].file, r));
      return;
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      const bad = pending.find((p) => err.message.startsWith(`${p.file.name}:`));
      if (!bad) {
        for (const p of pending) $(".verdict .pending", p.card).textContent = "not classified";
        showError($("#classify-error"), err);
        return;
      }
      bad.card.classList.add("bad");
      $(".verdict .pending", bad.card).replaceWith(el("p", { class: "error", role: "alert", text: err.message }));
      pending = pending.filter((p) => p !== bad);
    }
  }
}

// Unique names within one request, so an error naming a file names exactly one card.
function uniqueNames(files) {
  const seen = new Set();
  return files.map((file) => {
    let name = file.name || "pasted.png";
    for (let i = 2; seen.has(name); i++) name = `${i}-${file.name || "pasted.png"}`;
    seen.add(name);
    return name === file.name ? file : new File([file], name, { type: file.type });
  });
}

async function switchMethod(event) {
  event.preventDefault();
  if (!current) return;
  const button = $("#method-submit");
  const method = $("#method-switch").value;
  button.disabled = true;
  $("#method-status").textContent = `tuning every method on the stored shots, then serving ${method}…`;
  showError($("#method-error"), null);
  try {
    const { body } = await request("PATCH", taskPath(current.id), { json: { method } });
    renderTask(body);
    $("#method-status").textContent = `now serving ${body.method}`;
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    $("#method-status").textContent = "";
    showError($("#method-error"), err);
  } finally {
    button.disabled = false;
  }
}

export function setupTask(info) {
  $("#method-switch").replaceChildren(...info.methods.map((m) => el("option", { value: m, text: m })));
  $("#method-form").addEventListener("submit", switchMethod);
  const input = $("#classify-files");
  input.addEventListener("change", () => {
    classifyFiles(uniqueNames([...input.files]));
    input.value = "";
  });
  dropTarget($("#classify-drop"), (items) => classifyFiles(uniqueNames(items.map((i) => i.file).filter(looksLikeImage))));
  document.addEventListener("paste", (event) => {
    if ($("#screen-task").hidden || !current) return;
    const files = [...event.clipboardData.files].filter(looksLikeImage);
    if (files.length) {
      event.preventDefault();
      classifyFiles(uniqueNames(files));
    }
  });
}
