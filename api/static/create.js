// The "new task" screen: classes with names, optional prompts and images (picked, dropped, or whole
// folders), uploaded with a progress bar, then the background build followed until the task is ready.

import { ApiError, upload, waitForTask } from "./api.js";
import { $, dropTarget, el, looksLikeImage, showError } from "./dom.js";

let nextId = 0;
const classes = []; // {id, card, files: [{file, item, error}]}

function card(cls) {
  return cls.card;
}

function refreshSummary() {
  const shots = classes.reduce((n, c) => n + c.files.length, 0);
  $("#create-summary").textContent = `${classes.length} class${classes.length === 1 ? "" : "es"}, ${shots} image${shots === 1 ? "" : "s"}`;
  for (const cls of classes) {
    const n = cls.files.length;
    $(".count", card(cls)).textContent = `${n} image${n === 1 ? "" : "s"}`;
  }
}

function addFiles(cls, files) {
  const list = $(".thumbs", card(cls));
  for (const file of files) {
    const entry = { file, error: null };
    const remove = el("button", { type: "button", class: "thumb-remove", "aria-label": `Remove ${file.name}`, text: "×" });
    const img = el("img", { alt: file.name, src: URL.createObjectURL(file), loading: "lazy" });
    img.addEventListener("error", () => img.replaceWith(el("span", { class: "no-preview", text: "no preview" })));
    const message = el("span", { class: "thumb-error", role: "alert" });
    entry.item = el("li", { class: "thumb", title: file.name }, img, el("span", { class: "thumb-name", text: file.name }), message, remove);
    entry.message = message;
    remove.addEventListener("click", () => {
      cls.files.splice(cls.files.indexOf(entry), 1);
      entry.item.remove();
      refreshSummary();
    });
    cls.files.push(entry);
    list.append(entry.item);
  }
  refreshSummary();
}

export function addClass(name = "", files = []) {
  const id = nextId++;
  const fragment = $("#class-card").content.cloneNode(true);
  const fieldset = fragment.querySelector("fieldset");
  const cls = { id, card: fieldset, files: [] };
  $("legend", fieldset).textContent = `Class ${classes.length + 1}`;
  const nameInput = $(".class-name", fieldset);
  nameInput.value = name;
  nameInput.id = `class-name-${id}`;
  const filesInput = $("input.files", fieldset);
  const folderInput = $("input.folder", fieldset);
  filesInput.id = `class-files-${id}`;
  folderInput.id = `class-folder-${id}`;
  $(".pick-files", fieldset).htmlFor = filesInput.id;
  $(".pick-folder", fieldset).htmlFor = folderInput.id;
  filesInput.setAttribute("aria-label", "Images of this class");
  folderInput.setAttribute("aria-label", "A folder of images of this class");
  filesInput.addEventListener("change", () => {
    addFiles(cls, [...filesInput.files]);
    filesInput.value = "";
  });
  folderInput.addEventListener("change", () => {
    addFiles(cls, [...folderInput.files].filter(looksLikeImage));
    folderInput.value = "";
  });
  dropTarget($(".dropzone", fieldset), (dropped) => {
    const walked = dropped.some((d) => d.path.includes("/"));
    addFiles(cls, dropped.map((d) => d.file).filter((f) => !walked || looksLikeImage(f)));
  });
  $(".remove-class", fieldset).addEventListener("click", () => {
    classes.splice(classes.indexOf(cls), 1);
    fieldset.remove();
    refreshSummary();
  });
  classes.push(cls);
  $("#class-list").append(fieldset);
  addFiles(cls, files);
  return cls;
}

// {file, path} with path "root/cat/1.jpg" or "cat/1.jpg": the class is the image's folder.
function addClassFolders(items) {
  const byClass = new Map();
  for (const { file, path } of items) {
    const parts = path.split("/");
    if (parts.length < 2 || !looksLikeImage(file)) continue;
    const name = parts[parts.length - 2].replaceAll("_", " "); // as `shotcache task create --from-folder`
    if (!byClass.has(name)) byClass.set(name, []);
    byClass.get(name).push(file);
  }
  for (const [name, files] of [...byClass].sort(([a], [b]) => a.localeCompare(b))) {
    const existing = classes.find((c) => $(".class-name", card(c)).value.trim() === name);
    if (existing) addFiles(existing, files);
    else {
      const empty = classes.find((c) => !c.files.length && !$(".class-name", card(c)).value.trim());
      if (empty) {
        $(".class-name", card(empty)).value = name;
        addFiles(empty, files);
      } else addClass(name, files);
    }
  }
}

const size = (bytes) => (bytes < 2 ** 20 ? `${Math.ceil(bytes / 1024)} kB` : `${(bytes / 2 ** 20).toFixed(1)} MB`);

function clearErrors() {
  showError($("#create-error"), null);
  for (const cls of classes) {
    for (const entry of cls.files) {
      entry.item.classList.remove("bad");
      entry.message.textContent = "";
    }
  }
}

// Upload names are unique ("cat/1.jpg"), so an error message that starts with one names its file.
function formOf() {
  const form = new FormData();
  const byUploadName = new Map();
  const prompts = {};
  const seen = new Set();
  for (const cls of classes) {
    const name = $(".class-name", card(cls)).value.trim();
    if (!name) throw new Error("every class needs a name");
    if (seen.has(name)) throw new Error(`two classes are named ${JSON.stringify(name)}`);
    seen.add(name);
    if (!cls.files.length) throw new Error(`class ${JSON.stringify(name)} has no images`);
    const lines = $(".class-prompts", card(cls)).value.split("\n").map((s) => s.trim()).filter(Boolean);
    if (lines.length) prompts[name] = lines;
    for (const entry of cls.files) {
      let uploadName = `${name}/${entry.file.name}`;
      for (let i = 2; byUploadName.has(uploadName); i++) uploadName = `${name}/${i}-${entry.file.name}`;
      byUploadName.set(uploadName, entry);
      form.append("images", entry.file, uploadName);
      form.append("labels", name);
    }
  }
  if (!classes.length) throw new Error("add at least one class with images");
  const taskName = $("#task-name").value.trim();
  if (taskName) form.append("name", taskName);
  const method = $("#task-method").value;
  if (method) form.append("method", method);
  if (Object.keys(prompts).length) form.append("classes", JSON.stringify(prompts));
  form.append("wait", "false");
  return { form, byUploadName };
}

function blame(error, byUploadName) {
  for (const [uploadName, entry] of byUploadName) {
    if (error.message.startsWith(`${uploadName}:`) || error.message.startsWith(`${uploadName} `)) {
      entry.item.classList.add("bad");
      entry.message.textContent = error.message.slice(uploadName.length + 1).trim();
      entry.item.scrollIntoView({ block: "nearest" });
      return `${entry.file.name} was refused: ${error.message}`;
    }
  }
  return error.message;
}

async function submit(event, onReady) {
  event.preventDefault();
  clearErrors();
  let built;
  try {
    built = formOf();
  } catch (err) {
    showError($("#create-error"), err);
    return;
  }
  const button = $("#create-submit");
  button.disabled = true;
  const block = $("#create-progress");
  block.hidden = false;
  const uploadBar = $("#upload-bar");
  const buildBar = $("#build-bar");
  uploadBar.value = 0;
  buildBar.value = 0;
  $("#build-text").textContent = "";
  try {
    const { body } = await upload("/v1/tasks", built.form, (sent, total) => {
      uploadBar.value = sent / total;
      $("#upload-text").textContent = `${size(sent)} of ${size(total)}`;
    });
    uploadBar.value = 1;
    const task = await waitForTask(body.id, (done, total) => {
      buildBar.value = total ? done / total : 0;
      $("#build-text").textContent = `${done} of ${total} shots encoded`;
    });
    buildBar.value = 1;
    $("#build-text").textContent = "ready";
    onReady(task);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    showError($("#create-error"), { message: blame(err, built.byUploadName) });
  } finally {
    button.disabled = false;
  }
}

export function resetCreate() {
  for (const cls of [...classes]) {
    cls.card.remove();
  }
  classes.length = 0;
  $("#task-name").value = "";
  $("#create-progress").hidden = true;
  clearErrors();
  addClass();
  addClass();
}

export function setupCreate(info, onReady) {
  const select = $("#task-method");
  select.replaceChildren(el("option", { value: "", text: `default (${info.default_method})` }));
  for (const method of info.methods) select.append(el("option", { value: method, text: method === "auto" ? "auto (best held-out; 3+ shots: top two)" : method }));
  $("#add-class").addEventListener("click", () => $(".class-name", card(addClass())).focus());
  const folder = $("#classes-folder");
  folder.addEventListener("change", () => {
    addClassFolders([...folder.files].map((file) => ({ file, path: file.webkitRelativePath || file.name })));
    folder.value = "";
  });
  dropTarget($("#create-form"), addClassFolders);
  $("#create-form").addEventListener("submit", (event) => submit(event, onReady));
  resetCreate();
}
