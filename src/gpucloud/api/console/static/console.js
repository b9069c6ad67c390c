// gpucloud console: keeps a page's figures fresh by polling its JSON twin. Text is set
// with textContent only (never markup), so nothing a tenant typed can run here.
(function () {
  "use strict";
  var root = document.querySelector("[data-live]");
  if (!root) return;
  var url = root.getAttribute("data-live");
  var every = Math.max(0.2, Number(root.getAttribute("data-every")) || 5) * 1000;
  var stale = document.querySelector("[data-stale]");
  var timer = null;

  function setStale(on) { if (stale) stale.hidden = !on; }

  function cell(tag, text, href) {
    var el = document.createElement(tag);
    if (tag === "th") el.scope = "row";
    if (href && href.charAt(0) === "/") {
      var a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      el.appendChild(a);
    } else {
      el.textContent = text;
    }
    return el;
  }

  // What a table body shows, cell by cell: rows are rebuilt only when it changes, so
  // keyboard focus inside a table is not lost to a refresh that changed nothing.
  function shown(tbody) {
    return Array.from(tbody.rows, function (tr) {
      return Array.from(tr.cells, function (c) { return c.textContent.trim(); }).join("\u0001");
    }).join("\u0002");
  }

  function wanted(rows, cols, empty) {
    if (!rows.length) return empty;
    return rows.map(function (row) {
      return cols.map(function (col) {
        return row[col] == null ? "" : String(row[col]).trim();
      }).join("\u0001");
    }).join("\u0002");
  }

  function fillRows(tbody, rows) {
    var cols = tbody.getAttribute("data-cols").split(",");
    if (shown(tbody) === wanted(rows, cols, tbody.getAttribute("data-empty") || "")) return;
    var out = [];
    if (!rows.length) {
      var tr = document.createElement("tr");
      var td = cell("td", tbody.getAttribute("data-empty") || "");
      td.colSpan = cols.length;
      tr.appendChild(td);
      out.push(tr);
    }
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      cols.forEach(function (col, i) {
        var text = row[col] == null ? "" : String(row[col]);
        tr.appendChild(cell(i === 0 ? "th" : "td", text, i === 0 ? row.href : null));
      });
      out.push(tr);
    });
    tbody.replaceChildren.apply(tbody, out);
  }

  function apply(data) {
    document.querySelectorAll("[data-field]").forEach(function (el) {
      var v = data[el.getAttribute("data-field")];
      if (v != null && el.textContent !== String(v)) el.textContent = String(v);
    });
    document.querySelectorAll("[data-show-if]").forEach(function (el) {
      el.hidden = !data[el.getAttribute("data-show-if")];
    });
    document.querySelectorAll("tbody[data-rows]").forEach(function (tbody) {
      var rows = data[tbody.getAttribute("data-rows")];
      if (Array.isArray(rows)) fillRows(tbody, rows);
    });
    if (data.done) { clearInterval(timer); root.setAttribute("data-done", ""); }
  }

  function tick() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (resp) {
        if (resp.status === 401) {
          window.location.assign(root.getAttribute("data-login") + "?ended=1&next=" +
            encodeURIComponent(window.location.pathname));
          return null;
        }
        if (!resp.ok) throw new Error(String(resp.status));
        return resp.json();
      })
      .then(function (data) { if (data) { setStale(false); apply(data); } })
      .catch(function () { setStale(true); });
  }

  if (!root.hasAttribute("data-done")) timer = setInterval(tick, every);
})();
