// Live statistics for a campaign's page (docs/aggregator.md "Live statistics"). The page is complete without this script; with it, the page follows the
// campaign's Server-Sent Events stream and, whenever the statistics change, asks the
// server for the page again and swaps in its live part (the server renders it from the
// snapshot it just streamed), keeping open tables open. One rendering, on the server.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource || !window.fetch || !window.DOMParser) {
    return;
  }
  var shown = live.getAttribute("data-updated") || "";
  var busy = false;
  var again = false;

  function say(text, on) {
    var status = document.getElementById("live-status"); // replaced with each swap
    if (status) {
      status.textContent = text;
      status.className = on ? "live on" : "live";
    }
  }

  function swap() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(window.location.href, {
      headers: { "X-Mailbeacon-Live": "1" },
      credentials: "same-origin",
      cache: "no-store",
    })
      .then(function (response) {
        if (!response.ok) {
          throw new Error(String(response.status));
        }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var current = document.getElementById("live");
        if (!fresh || !current) {
          return;
        }
        current.querySelectorAll("details[open]").forEach(function (opened) {
          var twin = opened.id && fresh.querySelector("#" + opened.id);
          if (twin) {
            twin.setAttribute("open", "");
          }
        });
        current.replaceWith(document.importNode(fresh, true));
        say("live", true);
      })
      .catch(function () {
        say("live updates paused", false);
      })
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          swap();
        }
      });
  }

  var source = new EventSource(live.getAttribute("data-stream"));
  source.addEventListener("statistics", function (event) {
    say("live", true);
    var updated = JSON.parse(event.data).updated_at || "";
    if (updated !== shown) {
      shown = updated;
      swap();
    }
  });
  source.addEventListener("error", function () {
    say(source.readyState === EventSource.CLOSED ? "not live: reload the page" : "reconnecting…", false);
  });
})();
