// Training Lab: small page helpers. A1111 loads every file in javascript/ into <head>; the standalone app
// inlines this file the same way. Everything here is optional polish: the tabs work without it.
//  - the browser tab title shows the running job's progress ("[42%] ..."), read from the Monitor's bar;
//  - the loss chart shows the value under the mouse pointer.
(function () {
    "use strict";

    function app() {
        // A1111 defines gradioApp(); standalone gradio renders into the document (or a shadow root)
        if (typeof gradioApp === "function") return gradioApp();
        var root = document.querySelector("gradio-app");
        return (root && root.shadowRoot) ? root.shadowRoot : document;
    }

    var baseTitle = null;

    function updateTitle() {
        var bar = app().querySelector("#training_lab_monitor_progress .training-lab-progress");
        if (baseTitle === null) baseTitle = document.title.replace(/^\[\d+%\] /, "");
        if (!bar || !/tl-running/.test(bar.className)) {
            if (document.title !== baseTitle) document.title = baseTitle;
            return;
        }
        var pct = Math.round(100 * parseFloat(bar.getAttribute("data-fraction") || "0"));
        var title = "[" + pct + "%] " + baseTitle;
        if (document.title !== title) document.title = title;
    }

    function chartHover(event) {
        var svg = event.target.closest && event.target.closest("svg.training-lab-chart");
        if (!svg) return;
        var line = svg.querySelector("polyline.tl-ema") || svg.querySelector("polyline.tl-loss");
        if (!line) return;
        var pt = svg.createSVGPoint();
        pt.x = event.clientX;
        pt.y = event.clientY;
        var local = pt.matrixTransform(svg.getScreenCTM().inverse());
        var points = line.getAttribute("points").split(" ").map(function (p) {
            var xy = p.split(",");
            return [parseFloat(xy[0]), parseFloat(xy[1])];
        });
        var best = points[0];
        points.forEach(function (p) { if (Math.abs(p[0] - local.x) < Math.abs(best[0] - local.x)) best = p; });
        var mark = svg.querySelector("circle.tl-hover");
        if (!mark) {
            mark = document.createElementNS("http://www.w3.org/2000/svg", "circle");
            mark.setAttribute("class", "tl-hover");
            mark.setAttribute("r", "3.5");
            mark.setAttribute("fill", "#f08a24");
            svg.appendChild(mark);
        }
        mark.setAttribute("cx", best[0]);
        mark.setAttribute("cy", best[1]);
    }

    function start() {
        setInterval(updateTitle, 1000);
        document.addEventListener("mousemove", chartHover, true);
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(start);                           // A1111
    } else if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", start);
    } else {
        start();
    }
})();
