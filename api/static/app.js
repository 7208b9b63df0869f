// Entry point: model banner, API key, the task list, and a hash router between the three screens.

import { ApiError, apiKey, forgetThumbnails, getJSON, request, setApiKey } from "./api.js";
import { resetCreate, setupCreate } from "./create.js";
import { $, el, keyboardPickers, percent, showError } from "./dom.js";
import { setupTask, showTask } from "./task.js";

let info = null;

function showScreen(name) {
  for (const screen of document.querySelectorAll(".screen")) screen.hidden = screen.id !== `screen-${name}`;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.id === `nav-${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function needKey(message) {
  const form = $("#key-form");
  form.hidden = false;
  $("#key-error").textContent = apiKey() ? message : "";
  $("#api-key").focus();
}

function globalError(err) {
  const banner = $("#global-error");
  banner.hidden = !err;
  banner.textContent = err ? err.message : "";
}

async function confirmDelete(task) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = `Delete task “${task.name || task.id}” and its ${task.classes.length} classes? This cannot be undone.`;
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  return dialog.returnValue === "ok";
}

async function renderTasks() {
  const list = await getJSON("/v1/tasks");
  const body = $("#tasks-body");
  body.replaceChildren(...list.tasks.map((task) => {
    const shots = task.classes.reduce((n, c) => n + c.shots, 0);
    const remove = el("button", { type: "button", class: "danger small-button", text: "Delete", "aria-label": `Delete task ${task.name || task.id}` });
    remove.addEventListener("click", async () => {
      if (!(await confirmDelete(task))) return;
      try {
        await request("DELETE", `/v1/tasks/${encodeURIComponent(task.id)}`);
        forgetThumbnails(task.id);
        await renderTasks();
      } catch (err) {
        if (!(err instanceof ApiError)) throw err;
        globalError(err);
      }
    });
    return el("tr", {},
      el("th", { scope: "row" }, el("a", { href: `#/task/${task.id}`, text: task.name || task.id })),
      el("td", { text: task.classes.length }), el("td", { text: shots }), el("td", { text: task.method }),
      el("td", { text: percent(task.loo_accuracy) }), el("td", { text: task.version }), el("td", {}, remove));
  }));
  $("#tasks-table").hidden = !list.tasks.length;
  $("#tasks-empty").hidden = Boolean(list.tasks.length || list.building.length);
  $("#building-list").replaceChildren(...list.building.map((b) =>
    el("li", { class: b.status === "failed" ? "error" : "" }, el("a", { href: `#/task/${b.id}`, text: b.id }),
      b.status === "failed" ? ` failed: ${b.error ? b.error.message : "unknown error"}` : ` building: ${b.done} of ${b.total} shots`)));
}

async function route() {
  globalError(null);
  const hash = location.hash || "#/";
  try {
    if (hash.startsWith("#/task/")) {
      showScreen("task");
      await showTask(decodeURIComponent(hash.slice("#/task/".length)));
    } else if (hash === "#/new") {
      showScreen("new");
    } else {
      showScreen("tasks");
      await renderTasks();
    }
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.status === 401) needKey(err.message);
    else globalError(err);
  }
}

async function start() {
  try {
    info = await getJSON("/v1/info");
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.status === 401) needKey(err.message);
    else globalError(err);
    return false;
  }
  $("#key-form").hidden = true;
  const model = info.model;
  $("#model").textContent = `model ${model.model_id} · ${model.backend}`;
  if (model.standin) {
    $("#standin-banner").hidden = false;
    if (model.standin_reason) $("#standin-reason").textContent = `The service runs the offline stand-in model (${model.standin_reason}): fine for trying it, not for judging accuracy.`;
  }
  setupCreate(info, (task) => {
    resetCreate();
    location.hash = `#/task/${task.id}`;
  });
  setupTask(info);
  window.addEventListener("hashchange", route);
  await route();
  return true;
}

keyboardPickers();
$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  setApiKey($("#api-key").value.trim());
  showError($("#key-error"), null);
  if (info) {
    $("#key-form").hidden = true;
    await route();
  } else await start();
});
start();
