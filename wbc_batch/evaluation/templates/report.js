/* wbc-batch report.html: the reviewer's choices. Inlined by report_render, plain JavaScript, no network.
   Every element with class rv (a gallery cell, a review row) carries data-path and data-pred; its .choice
   element gets one button per model label and one for EXCLUDE. Choices are kept in localStorage under the
   report's key, and saved as corrections.csv (path,label): the format of wbc-batch's --labels. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("review-data").textContent);
  var labels = data.labels, EXCLUDE = data.exclude, storeKey = "wbc-batch-review:" + data.key;
  var items = Array.prototype.slice.call(document.querySelectorAll(".rv"));
  var byPath = {};
  var choices = load();

  function load() {
    try {
      var kept = window.localStorage.getItem(storeKey);
      if (kept !== null) return JSON.parse(kept);
    } catch (e) {
      storageProblem();
    }
    return Object.assign({}, data.corrections);
  }

  function store() {
    try {
      window.localStorage.setItem(storeKey, JSON.stringify(choices));
    } catch (e) {
      storageProblem();
    }
  }

  function storageProblem() {
    var el = document.getElementById("review-storage");
    if (el) el.textContent = "This browser does not keep the choices: save corrections.csv before closing the page.";
  }

  function button(el, label, text, title) {
    var b = document.createElement("button");
    b.type = "button";
    b.className = label === EXCLUDE ? "pick ex" : "pick";
    b.dataset.label = label;
    b.textContent = text;
    b.title = title;
    b.setAttribute("aria-pressed", "false");
    b.tabIndex = -1; /* Tab goes from cell to cell; the keys choose within one */
    b.addEventListener("click", function (ev) {
      ev.stopPropagation();
      choose(el, choices[el.dataset.path] === label ? null : label, false);
    });
    return b;
  }

  function build(el) {
    var box = el.querySelector(".choice");
    labels.forEach(function (lb, i) {
      var key = i < 9 ? String(i + 1) : "";
      box.appendChild(button(el, lb, (key ? key + " " : "") + lb, key ? "key " + key : "click"));
    });
    box.appendChild(button(el, EXCLUDE, "0 not a cell / cannot tell", "key 0: leave this file out of the differential"));
    el.querySelectorAll("summary").forEach(function (sm) { sm.tabIndex = -1; }); /* Tab: one stop per cell */
    el.addEventListener("click", function () { el.focus(); });
  }

  function show(path) {
    (byPath[path] || []).forEach(function (el) {
      var chosen = choices[path];
      el.classList.toggle("done", chosen !== undefined);
      el.classList.toggle("changed", chosen !== undefined && chosen !== el.dataset.pred);
      el.querySelectorAll(".choice button").forEach(function (b) {
        b.setAttribute("aria-pressed", String(b.dataset.label === chosen));
      });
    });
  }

  function tally() {
    var reviewed = 0, changed = 0, excluded = 0, pred = Object.assign({}, data.predicted);
    items.forEach(function (el) { pred[el.dataset.path] = el.dataset.pred; });
    Object.keys(choices).forEach(function (p) {
      reviewed += 1;
      if (choices[p] === EXCLUDE) excluded += 1;
      else if (pred[p] !== undefined && choices[p] !== pred[p]) changed += 1;
    });
    document.getElementById("review-tally").textContent =
      reviewed + " reviewed · " + changed + " given another class · " + excluded + " excluded";
  }

  function choose(el, label, advance) {
    var path = el.dataset.path;
    if (label === null) delete choices[path];
    else choices[path] = label;
    store();
    show(path);
    tally();
    if (advance) move(el, 1);
  }

  function move(el, step) {
    var i = items.indexOf(el) + step;
    if (i >= 0 && i < items.length) {
      items[i].focus();
      items[i].scrollIntoView({block: "nearest"});
    }
  }

  function onKey(ev) {
    var el = document.activeElement && document.activeElement.closest ? document.activeElement.closest(".rv") : null;
    if (!el || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var k = ev.key, n = parseInt(k, 10);
    if (ev.target.tagName === "BUTTON" && (k === "Enter" || k === " ")) return;
    if (n >= 1 && n <= Math.min(9, labels.length)) choose(el, labels[n - 1], true);
    else if (k === "0" || k === "x" || k === "X") choose(el, EXCLUDE, true);
    else if (k === "Enter") choose(el, el.dataset.pred, true);
    else if (k === "Backspace" || k === "Delete") choose(el, null, false);
    else if (k === "ArrowDown" || k === "j") move(el, 1);
    else if (k === "ArrowUp" || k === "k") move(el, -1);
    else if (k === " " || k === "Escape") enlarge(el, k === " ");
    else return;
    ev.preventDefault();
  }

  function enlarge(el, toggle) {
    var zoom = el.querySelector("details.zoom");
    if (zoom) zoom.open = toggle ? !zoom.open : false;
  }

  function csvCell(text) {
    if (/^[=+\-@\t\r]/.test(text)) text = "./" + text; /* as predictions.csv writes such a path: no formula */
    return /[",\r\n]|^\s|\s$/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function save() {
    var lines = ["path,label"];
    Object.keys(choices).forEach(function (p) { lines.push(csvCell(p) + "," + csvCell(choices[p])); });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], {type: "text/csv"}));
    a.download = "corrections.csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  function clearAll() {
    if (!window.confirm("Clear every choice made on this page?")) return;
    choices = {};
    store();
    Object.keys(byPath).forEach(show);
    tally();
  }

  items.forEach(function (el) {
    (byPath[el.dataset.path] = byPath[el.dataset.path] || []).push(el);
    build(el);
  });
  Object.keys(byPath).forEach(show);
  document.getElementById("review-tools").hidden = false;
  document.getElementById("save-corrections").addEventListener("click", save);
  document.getElementById("clear-corrections").addEventListener("click", clearAll);
  document.addEventListener("keydown", onKey);
  tally();
})();
