// Drives JupyterLab in headless Chromium (playwright-core, Debian's /usr/bin/chromium): opens the explorer
// notebook, runs all cells, moves the frame slider of both explorers, clicks a token of the routing explorer,
// switches its operator, and saves screenshots plus result.json (DOM checks) into --out.
// Usage: node explorers.js --url URL --chromium /usr/bin/chromium --profile DIR --out DIR
const { chromium } = require("playwright-core");
const fs = require("fs");
const path = require("path");

const arg = (k) => { const i = process.argv.indexOf(`--${k}`); if (i < 0) throw new Error(`missing --${k}`); return process.argv[i + 1]; };
const url = arg("url"), exe = arg("chromium"), profile = arg("profile"), out = arg("out");
const result = { steps: [] };
const log = (msg) => { console.log(msg); result.steps.push(msg); };

async function poll(fn, what, timeout = 60000) {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t0 > timeout) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

(async () => {
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: exe, headless: true, viewport: { width: 1500, height: 1100 },
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = ctx.pages()[0] || (await ctx.newPage());
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  let failed = null;
  try {
    await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
    await page.waitForSelector(".jp-NotebookPanel .jp-Cell", { timeout: 120000 });
    await poll(() => page.evaluate(() => !!document.querySelector(".jp-Notebook-ExecutionIndicator, .jp-Toolbar-kernelStatus")),
               "the notebook toolbar", 60000);
    log("notebook open");
    const acceptDialog = async () => {   // a "Select Kernel" dialog: take the proposed kernel
      const d = page.locator(".jp-Dialog .jp-mod-accept");
      if (await d.count()) { await d.first().click(); log("accepted a dialog (kernel selection)"); }
    };
    await page.waitForTimeout(2000);
    await acceptDialog();
    await poll(() => page.evaluate(() => /\| Idle/.test(document.querySelector(".jp-StatusBar-Widget, #jp-main-statusbar")?.innerText || "")),
               "an idle kernel", 60000).catch(() => log("kernel status not seen as idle; running anyway"));
    // Run > Run All Cells
    await page.click('.lm-MenuBar-itemLabel:text-is("Run")');
    await page.click('.lm-Menu-itemLabel:text-is("Run All Cells")');
    log("run all cells");
    await page.waitForTimeout(1000);
    await acceptDialog();
    const plots = page.locator(".jp-OutputArea .js-plotly-plot");
    await poll(async () => {
      const err = await page.evaluate(() => document.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')?.innerText);
      if (err) throw new Error(`a notebook cell failed:\n${err.slice(-1500)}`);
      return (await plots.count()) >= 2;
    }, "two plotly widgets", 90000);
    const href = (k, sub) => page.evaluate(([k, sub]) => {
      const p = document.querySelectorAll(".jp-OutputArea .js-plotly-plot")[k];
      const im = p && p.querySelector(`.subplot.${sub} .heatmaplayer image`);
      return im ? (im.getAttribute("href") || im.getAttribute("xlink:href") || "") : "";
    }, [k, sub]);
    await poll(async () => (await href(0, "x2y2")).length > 100 && (await href(1, "x2y2")).length > 100, "rendered heatmaps", 120000);
    await page.waitForTimeout(1000);
    const shot = async (k, sub, name) => {
      const box = await plots.nth(k).locator(`rect.nsewdrag[data-subplot="${sub}"]`).boundingBox();
      await page.screenshot({ path: path.join(out, `${name}.png`), clip: box });
      return box;
    };
    // the k-th ipywidgets slider labelled `frame` (each explorer also has opacity / margin sliders)
    const frameSlider = (k) => page.locator(".widget-slider").filter({ has: page.locator(".widget-label", { hasText: /^frame$/ }) }).nth(k);
    const slider = async (k, dx) => {   // drag the handle of the k-th frame slider by dx pixels
      const h = frameSlider(k).locator(".noUi-handle");
      await h.scrollIntoViewIfNeeded();
      const b = await h.boundingBox();
      await page.mouse.move(b.x + b.width / 2, b.y + b.height / 2);
      await page.mouse.down();
      for (let s = 1; s <= 10; s++) await page.mouse.move(b.x + b.width / 2 + (dx * s) / 10, b.y + b.height / 2);
      await page.mouse.up();
      return frameSlider(k).locator(".widget-readout").innerText();
    };
    // --- saliency explorer: frame slider
    await plots.nth(0).scrollIntoViewIfNeeded();
    await page.screenshot({ path: path.join(out, "00_page_initial.png") });
    const s0 = await href(0, "x2y2");
    await shot(0, "x2y2", "10_saliency_before");
    const sv = await slider(0, 90);
    log(`saliency slider -> frame ${sv}`);
    await poll(async () => (await href(0, "x2y2")) !== s0, "the saliency heatmap to change after the slider", 60000);
    await page.waitForTimeout(500);
    await shot(0, "x2y2", "11_saliency_after_slider");
    result.saliency = { slider_value: sv, heatmap_changed: (await href(0, "x2y2")) !== s0 };
    // --- routing explorer: frame slider, token click, operator switch
    await plots.nth(1).scrollIntoViewIfNeeded();
    const info = page.locator(".widget-html-content").filter({ hasText: "(t, h, w)" }).first();
    const info0 = await info.innerText();
    const r0 = { w: await href(1, "xy"), W: await href(1, "x2y2"), Sp: await href(1, "x4y4") };
    await shot(1, "xy", "20_routing_frame_before");
    await shot(1, "x4y4", "21_routing_Sp_before");
    const rv = await slider(1, 70);
    log(`routing slider -> frame ${rv}`);
    await poll(async () => (await href(1, "xy")) !== r0.w, "the w overlay to change after the slider", 60000);
    await page.waitForTimeout(500);
    await shot(1, "xy", "22_routing_frame_after_slider");
    await shot(1, "x4y4", "23_routing_Sp_after_slider");
    const r1 = { Sp: await href(1, "x4y4"), W: await href(1, "x2y2") };
    // click the token cell (h=2, w=5) of the 8 x 8 grid on the frame panel
    const box = await plots.nth(1).locator('rect.nsewdrag[data-subplot="xy"]').boundingBox();
    const [H, W, h, w] = [8, 8, 2, 5];
    await page.mouse.click(box.x + ((w + 0.5) / W) * box.width, box.y + ((h + 0.5) / H) * box.height);
    await poll(async () => (await info.innerText()).includes(`, ${h}, ${w})`), "the token line to show the clicked token", 60000);
    await poll(async () => (await href(1, "x4y4")) !== r1.Sp, "the S_p row to change after the click", 60000);
    await page.waitForTimeout(500);
    const info1 = await info.innerText();
    log(`clicked: ${info1}`);
    await shot(1, "x4y4", "24_routing_Sp_after_click");
    await shot(1, "x2y2", "25_routing_W_after_click");
    await plots.nth(1).screenshot({ path: path.join(out, "26_routing_after_click.png") });
    const W1 = await href(1, "x2y2");
    await page.click('.widget-toggle-button:text-is("and")');
    await poll(async () => (await info.innerText()).includes("op and"), "the operator to switch to and", 60000);
    await poll(async () => (await href(1, "x2y2")) !== W1, "the W row to change with the operator", 60000);
    await page.waitForTimeout(500);
    await shot(1, "x2y2", "27_routing_W_after_op_and");
    await plots.nth(1).screenshot({ path: path.join(out, "28_routing_after_op_and.png") });
    await page.screenshot({ path: path.join(out, "29_page_final.png"), fullPage: true });
    result.routing = { slider_value: rv, info_before: info0, info_after_click: info1,
                       overlay_changed_by_slider: r1.Sp !== r0.Sp || (await href(1, "xy")) !== r0.w,
                       Sp_changed_by_click: (await href(1, "x4y4")) !== r1.Sp,
                       W_changed_by_op: (await href(1, "x2y2")) !== W1 };
    log("done");
  } catch (e) {
    failed = e;
    try { await page.screenshot({ path: path.join(out, "99_failure.png"), fullPage: true }); } catch (_) {}
  }
  result.page_errors = errors;
  result.ok = !failed;
  if (failed) result.error = String(failed.stack || failed);
  fs.writeFileSync(path.join(out, "result.json"), JSON.stringify(result, null, 2));
  await ctx.close();
  if (failed) { console.error(`FAIL: ${failed}`); process.exit(1); }
})();
