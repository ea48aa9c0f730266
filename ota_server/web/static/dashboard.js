// The dashboard's one script: live rollout progress (polls the page's JSON endpoint) and "select all" on the
// device list. No framework, no inline script: everything it needs is in data-* attributes of the page.
(function () {
  "use strict";
  var TERMINAL = { completed: true, aborted: true, rolled_back: true };

  function byId(id) { return document.getElementById(id); }
  function fmt(n) { return Number(n || 0).toLocaleString("en-US"); }
  function setText(el, text) { if (el && el.textContent !== String(text)) { el.textContent = String(text); } }
  function num(v) {
    if (v === null || v === undefined) { return "-"; }
    if (typeof v === "number" && !Number.isInteger(v)) { return Number(v.toPrecision(3)).toString(); }
    return String(v);
  }

  function updateStage(stage) {
    var svg = byId("stage-" + stage.stage + "-progress");
    if (svg) {
      var size = stage.size > 0 ? stage.size : 0;
      var share = function (n) { return size ? Math.min(100, 100 * n / size) : 0; };
      var c = share(stage.committed), f = share(stage.failed), a = share(stage.active), w = share(stage.waiting);
      var bars = [["bar-committed", 0, c], ["bar-failed", c, f], ["bar-active", c + f, a], ["bar-waiting", c + f + a, w]];
      bars.forEach(function (b) {
        var rect = svg.querySelector("." + b[0]);
        if (rect) { rect.setAttribute("x", b[1].toFixed(3)); rect.setAttribute("width", b[2].toFixed(3)); }
      });
      svg.setAttribute("data-committed", stage.committed);
      svg.setAttribute("data-failed", stage.failed);
      svg.setAttribute("data-in-progress", stage.active);
      svg.setAttribute("data-waiting", stage.waiting);
    }
    var table = byId("stage-" + stage.stage + "-counts");
    if (table) {
      ["committed", "failed", "active", "waiting", "unassigned"].forEach(function (k) {
        setText(table.querySelector('td[data-bucket="' + k + '"]'), fmt(stage[k]));
      });
    }
    var section = document.querySelector('section.stage[data-stage="' + stage.stage + '"]');
    if (section) {
      section.querySelectorAll("td[data-state]").forEach(function (td) {
        setText(td, fmt(stage.counts[td.getAttribute("data-state")] || 0));
      });
    }
  }

  function updateGates(gates) {
    gates.forEach(function (g) {
      var row = document.querySelector('#gates tr[data-gate="' + g.name + '"]');
      if (!row) { return; }
      row.setAttribute("data-gate-state", g.state);
      var stateCell = row.querySelector(".gate-state");
      setText(stateCell, g.state);
      if (stateCell) { stateCell.className = "gate-state state-" + g.state; }
      setText(row.querySelector(".gate-value"), num(g.value));
      setText(row.querySelector(".gate-threshold"), num(g.threshold));
      var note = g.state === "not_evaluated"
        ? "not evaluated: " + (g.have || 0) + " of " + (g.need || 0) + " " + g.unit
        : g.detail;
      setText(row.querySelector(".gate-note"), note);
    });
  }

  function updateBanner(data) {
    var banner = byId("halt-banner");
    if (!banner) { return; }
    if (data.halted_by) {
      banner.classList.remove("hidden");
      banner.setAttribute("data-halted-by", data.halted_by);
      setText(byId("halt-gate"), data.halted_by);
      setText(byId("halt-state"), data.state);
      setText(byId("halt-detail"), data.detail);
    } else {
      banner.classList.add("hidden");
      banner.setAttribute("data-halted-by", "");
    }
  }

  function startLive(url) {
    var stateEl = byId("rollout-state");
    var shownState = stateEl ? stateEl.getAttribute("data-state") : "";
    var status = byId("live-status");
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (resp) {
          if (resp.status === 401) { window.location.assign("/ui/login"); throw new Error("signed out"); }
          if (!resp.ok) { throw new Error("HTTP " + resp.status); }
          return resp.json();
        })
        .then(function (data) {
          if (stateEl) {
            setText(stateEl, data.state);
            stateEl.setAttribute("data-state", data.state);
            stateEl.className = "state state-" + data.state;
          }
          setText(byId("rollout-stage"), data.current_stage + 1);
          (data.stages || []).forEach(updateStage);
          updateGates(data.gates || []);
          updateBanner(data);
          var stale = byId("actions-stale");
          if (stale && data.state !== shownState) { stale.classList.remove("hidden"); }
          setText(status, "live · updated " + new Date().toLocaleTimeString());
          if (status) { status.setAttribute("data-updated", data.updated_at); }
          window.setTimeout(tick, TERMINAL[data.state] ? 15000 : 2000);
        })
        .catch(function (err) {
          setText(status, "live updates paused (" + err.message + "), retrying");
          window.setTimeout(tick, 5000);
        });
    }
    window.setTimeout(tick, 2000);
  }

  function selectAll() {
    var box = byId("select-all");
    if (!box) { return; }
    box.addEventListener("change", function () {
      document.querySelectorAll("input.device-select").forEach(function (el) { el.checked = box.checked; });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var url = document.body.getAttribute("data-live-url");
    if (url) { startLive(url); }
    selectAll();
  });
})();
