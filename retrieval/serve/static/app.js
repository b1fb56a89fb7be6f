// The page of `retrieve serve`: it only calls the JSON API (see the README for every endpoint).
"use strict";

const $ = (selector) => document.querySelector(selector);
const PAGE = 60;
const GROUPS = 20;
let token = null;
let browseOffset = 0;
let dupOffset = 0;
const asked = { duplicates: 0, clusters: 0 }; // only the latest answer of each view is shown

// A token given as #token=T stays in this tab; the cookie lets <img> requests carry it too.
function setToken(value) {
  token = value || null;
  if (token) {
    sessionStorage.setItem("retrieve-token", token);
    document.cookie = "retrieve_token=" + encodeURIComponent(token) + "; path=/; SameSite=Strict";
  }
}

async function api(path, init = {}) {
  const headers = Object.assign({}, init.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, init, { headers }));
  if (response.status === 401) {
    const given = window.prompt("This server needs a token:");
    if (given) {
      setToken(given);
      return api(path, init);
    }
  }
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function say(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// "1 image", "3 images": a count with its noun, for lines people read
function counted(n, noun) {
  return n + " " + noun + (n === 1 ? "" : "s");
}

function note(selector, text, isError = false) {
  const status = $(selector);
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function k() {
  return Math.min(1000, Math.max(1, parseInt($("#k").value, 10) || 6));
}

function tile(item, caption) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tile";
  button.dataset.id = item.id;
  button.title = item.path;
  const img = document.createElement("img");
  img.src = item.thumb_url + "?size=256";
  const name = item.path.split("/").pop();
  img.alt = (item.name || item.label || name) + " (" + name + ")";
  img.loading = "lazy";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = item.name || item.label || name;  // name: a WordNet id made readable
  button.append(img, label);
  if (caption) {
    const distance = document.createElement("span");
    distance.className = "distance";
    distance.textContent = caption;
    button.append(distance);
  }
  button.addEventListener("click", () => queryById(item.id));
  li.append(button);
  return li;
}

function show(answer, imageUrl) {
  $("#answer").hidden = false;
  $("#query-image").src = imageUrl;
  $("#query-title").textContent = answer.query + (answer.id !== undefined ? " (#" + answer.id + ")" : "");
  const classes = $("#classes");
  classes.replaceChildren(...answer.classes.map((c) => {
    const li = document.createElement("li");
    li.textContent = (c.name || c.label) + " " + (100 * c.probability).toFixed(1) + "%";
    return li;
  }));
  $("#results").replaceChildren(
    ...answer.neighbors.map((n) => tile(n, "#" + n.rank + "  d = " + n.distance.toFixed(2)))
  );
  say(answer.neighbors.length + " nearest images in " + answer.took_ms.toFixed(0) + " ms");
}

async function queryFile(file) {
  if (!file) return;
  showView("search");
  say("searching…");
  const form = new FormData();
  form.append("file", file, file.name || "pasted image");
  form.append("k", String(k()));
  try {
    show(await api("/api/query", { method: "POST", body: form }), URL.createObjectURL(file));
  } catch (error) {
    say(error.message, true);
  }
}

async function queryById(id) {
  showView("search");
  say("searching…");
  try {
    const answer = await api("/api/neighbors/" + id + "?k=" + k());
    show(answer, "/thumb/" + id + "?size=384");
    $("#results button")?.focus();
  } catch (error) {
    say(error.message, true);
  }
}

async function random() {
  try {
    const info = await api("/api/images?limit=1");
    if (!info.total) return say("the index is empty", true);
    const offset = Math.floor(Math.random() * info.total);
    const page = await api("/api/images?limit=1&offset=" + offset);
    await queryById(page.images[0].id);
  } catch (error) {
    say(error.message, true);
  }
}

async function browse(offset) {
  browseOffset = Math.max(0, offset);
  const params = new URLSearchParams({ offset: browseOffset, limit: PAGE });
  if ($("#label").value) params.set("label", $("#label").value);
  if ($("#contains").value) params.set("q", $("#contains").value);
  try {
    const page = await api("/api/images?" + params);
    // the file's name under its label: browsing, people look for a file they know
    $("#grid").replaceChildren(...page.images.map((row) => tile(row, row.path.split("/").pop())));
    const last = Math.min(page.total, browseOffset + page.images.length);
    $("#browse-status").textContent = page.total
      ? "images " + (browseOffset + 1) + "–" + last + " of " + page.total
      : "no image matches";
    $("#prev").disabled = browseOffset === 0;
    $("#next").disabled = last >= page.total;
  } catch (error) {
    $("#browse-status").textContent = error.message;
  }
}

// One row per duplicate group or cluster: a title, then its thumbnails in a strip.
function strip(title, tiles) {
  const li = document.createElement("li");
  li.className = "group";
  const heading = document.createElement("h3");
  heading.textContent = title;
  const ol = document.createElement("ol");
  ol.className = "strip";
  ol.append(...tiles);
  li.append(heading, ol);
  return li;
}

// What made a member a copy, from the verifier's evidence; the distance otherwise.
function howCopied(member, n, kind) {
  if (n === 0) return member.reference ? "keep (reference)" : "keep";
  if (kind === "exact") return "same bytes";
  if (member.evidence) return member.evidence.edits.join(", ");
  return "d = " + member.distance.toFixed(3);
}

// "Not a duplicate": remembered by the server (by content), then the groups are asked again.
function notDuplicateButton(group, member) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "not-duplicate";
  button.textContent = "not a duplicate";
  button.title = "Remember that this is not a duplicate of " + group.representative;
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const body = new URLSearchParams({ a: group.members[0].id, b: member.id });
      await api("/api/not-duplicate", { method: "POST", body });
      note("#dup-status", "remembered: not a duplicate");
      duplicates(dupOffset);
    } catch (error) {
      button.disabled = false;
      note("#dup-status", error.message, true);
    }
  });
  return button;
}

async function duplicates(offset) {
  const mine = ++asked.duplicates;
  dupOffset = Math.max(0, offset);
  const params = new URLSearchParams({ offset: dupOffset, limit: GROUPS, keep: $("#keep").value });
  const similar = $("#similar").checked;
  const threshold = $("#threshold").value.trim();
  if (similar) params.set("similar", "1");
  if (similar && threshold) params.set("threshold", threshold);
  note("#dup-status", similar && !threshold
    ? "calibrating the similar images' distance on this collection (a minute or so the first time)…"
    : "finding duplicates (the first time signs every image)…");
  try {
    const answer = await api("/api/duplicates?" + params);
    if (mine !== asked.duplicates) return;
    $("#dup-groups").replaceChildren(...answer.groups.map((group) => strip(
      "group " + group.group + "\n" + group.kind + " · " + counted(group.size, "file"),
      group.members.map((member, n) => {
        // the name, and its folder beside what made it a copy: exact copies often share a name
        const [folder, name] = member.path.split("/").slice(-2);
        const caption = howCopied(member, n, group.kind) + " · " + folder;
        const li = tile(Object.assign({ label: name }, member), caption);
        if (n === 0) li.firstChild.classList.add("keep");
        if (n > 0 && group.kind !== "exact") li.append(notDuplicateButton(group, member));
        return li;
      })
    )));
    const how = !similar ? ""
      : answer.calibrated
        ? "; similar: fc7 within " + answer.threshold.toFixed(3) + " (calibrated on "
          + answer.calibration.sampled + " images)"
        : "; similar: fc7 within " + answer.threshold.toFixed(3);
    const last = Math.min(answer.total, dupOffset + answer.groups.length);
    const counts = answer.exact_groups + " exact, " + answer.copy_groups + " verified copies"
      + (similar ? ", " + answer.similar_groups + " similar" : "");
    note("#dup-status", (answer.total
      ? counted(answer.total, "group") + " (" + counts + ") among "
        + counted(answer.images, "image")
        + (answer.total > 1 ? "; groups " + (dupOffset + 1) + "–" + last : "")
      : "no duplicates among " + counted(answer.images, "image"))
      + " (" + answer.candidates + " candidate pairs, " + answer.screened + " compared on their pixels"
        + (answer.remembered ? " (" + answer.remembered + " of them remembered from an earlier pass)" : "") + ", " + answer.verified + " verified)" + how);
    if (answer.calibrated) $("#threshold").placeholder = "calibrated: " + answer.threshold.toFixed(3);
    $("#dup-prev").disabled = dupOffset === 0;
    $("#dup-next").disabled = last >= answer.total;
  } catch (error) {
    if (mine === asked.duplicates) note("#dup-status", error.message, true);
  }
}

async function clusters() {
  const mine = ++asked.clusters;
  const params = new URLSearchParams({ per: 8 });
  const n = $("#cluster-k").value.trim();
  if (n) params.set("n", n); // else the server's default, as `retrieve cluster` without -n
  note("#cluster-status", "clustering…");
  try {
    const answer = await api("/api/clusters?" + params);
    if (mine !== asked.clusters) return;
    const rows = answer.clusters.map((cluster) => strip(
      "cluster " + cluster.cluster + "\n" + counted(cluster.size, "image")
        + (cluster.size ? "\n" + Object.entries(cluster.labels).map(([l, n]) => l + " " + n).join(", ") : ""),
      cluster.members.map((m) => tile(m, "d = " + m.distance.toFixed(3)))
    ));
    if (answer.outliers.length) {
      rows.push(strip("outliers\nfarthest from every centre",
        answer.outliers.map((m) => tile(m, "cluster " + m.cluster + ", d = " + m.distance.toFixed(3)))));
    }
    $("#cluster-rows").replaceChildren(...rows);
    $("#cluster-k").value = answer.k;
    const scores = answer.scores
      ? "; against folder labels: purity " + answer.scores.purity.toFixed(3) + ", NMI " + answer.scores.nmi.toFixed(3)
      : "";
    note("#cluster-status", answer.images + " images in " + answer.k + " clusters (" + answer.space
      + ", seed " + answer.seed + ")" + scores);
  } catch (error) {
    if (mine === asked.clusters) note("#cluster-status", error.message, true);
  }
}

function table(element, entries) {
  element.replaceChildren(...entries.map(([key, value]) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    const td = document.createElement("td");
    th.textContent = key;
    td.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    tr.append(th, td);
    return tr;
  }));
}

async function loadInfo() {
  try {
    const [info, labels] = await Promise.all([api("/api/info"), api("/api/labels")]);
    table($("#info-table"), Object.entries(info));
    table($("#labels-table"), Object.entries(labels));
    const select = $("#label");
    const chosen = select.value;
    select.replaceChildren(new Option("all", ""), ...Object.keys(labels).map((l) => new Option(l, l)));
    select.value = chosen;
  } catch (error) {
    say(error.message, true);
  }
}

function showView(name) {
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== name;
  for (const button of document.querySelectorAll("nav button")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === name));
  }
}

function start() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  setToken(fromHash || sessionStorage.getItem("retrieve-token"));
  if (fromHash) history.replaceState(null, "", location.pathname);
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => {
      showView(button.dataset.view);
      if (button.dataset.view === "browse") browse(browseOffset);
      if (button.dataset.view === "info") loadInfo();
      // whole-collection passes: run when a view is first opened, then on request
      if (button.dataset.view === "duplicates" && !asked.duplicates) duplicates(0);
      if (button.dataset.view === "clusters" && !asked.clusters) clusters();
    });
  }
  $("#file").addEventListener("change", (event) => queryFile(event.target.files[0]));
  $("#random").addEventListener("click", random);
  $("#query-form").addEventListener("submit", (event) => event.preventDefault());
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    queryFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) queryFile(item.getAsFile());
  });
  $("#browse-form").addEventListener("submit", (event) => { event.preventDefault(); browse(0); });
  $("#prev").addEventListener("click", () => browse(browseOffset - PAGE));
  $("#next").addEventListener("click", () => browse(browseOffset + PAGE));
  $("#dup-form").addEventListener("submit", (event) => { event.preventDefault(); duplicates(0); });
  $("#keep").addEventListener("change", () => duplicates(dupOffset)); // same groups, new leads
  $("#dup-prev").addEventListener("click", () => duplicates(dupOffset - GROUPS));
  $("#dup-next").addEventListener("click", () => duplicates(dupOffset + GROUPS));
  $("#cluster-form").addEventListener("submit", (event) => { event.preventDefault(); clusters(); });
  loadInfo();
}

start();
