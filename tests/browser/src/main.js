// The browser check's page: a SceneView whose basemap is a VectorTileLayer from our VectorTileServer
// and whose ground is an ElevationLayer from our ImageServer. Everything loads from 127.0.0.1:
// the SDK's assets are served next to this bundle (esriConfig.assetsPath). The page reports what it
// saw in window.__result; the test reads that, the console and the network log over CDP.
import esriConfig from "@arcgis/core/config.js";
import Basemap from "@arcgis/core/Basemap.js";
import Ground from "@arcgis/core/Ground.js";
import Map from "@arcgis/core/Map.js";
import ElevationLayer from "@arcgis/core/layers/ElevationLayer.js";
import VectorTileLayer from "@arcgis/core/layers/VectorTileLayer.js";
import SceneView from "@arcgis/core/views/SceneView.js";

const q = new URLSearchParams(location.search);
esriConfig.assetsPath = new URL("./assets", location.href).href;
esriConfig.request.useIdentity = false;
esriConfig.request.trustedServers = [];
esriConfig.portalUrl = q.get("portal") || location.origin;  // nothing is asked of arcgis.com

async function run() {
  const result = { ok: false, ms: {} };
  const mark = (name) => { result.ms[name] = Math.round(performance.now()); };
  window.__result = result;
  const vector = new VectorTileLayer({ url: q.get("vector") });
  const elevation = new ElevationLayer({ url: q.get("elevation") });
  await Promise.all([vector.load(), elevation.load()]);
  mark("layers");
  result.vector = { loaded: vector.loaded, styleLayers: vector.currentStyleInfo.style.layers.length,
                    tileFormat: vector.tileInfo.format, capabilities: vector.capabilities.operations };
  // one elevation tile through the SDK's own LERC1 decoder (LercWorker)
  const [lv, row, col] = q.get("tile").split(",").map(Number);
  const tile = await elevation.fetchTile(lv, row, col);
  mark("tile");
  result.elevation = { loaded: elevation.loaded, width: tile.width, height: tile.height,
                       min: tile.minValue, max: tile.maxValue, first: tile.values[0] };
  const map = new Map({ basemap: new Basemap({ baseLayers: [vector] }), ground: new Ground({ layers: [elevation] }) });
  const view = new SceneView({
    container: "view", map,
    camera: { position: { x: Number(q.get("x")), y: Number(q.get("y")), z: Number(q.get("z")),
                          spatialReference: { wkid: 3857 } }, tilt: Number(q.get("tilt") || 45), heading: 0 },
    environment: { atmosphereEnabled: false, starsEnabled: false },
    ui: { components: [] },
  });
  await view.when();
  mark("view");
  const layerView = await view.whenLayerView(vector);
  await new Promise((resolve) => {
    const check = () => (view.updating || layerView.updating ? setTimeout(check, 200) : resolve());
    setTimeout(check, 500);
  });
  mark("drawn");
  // the ground really has our heights: the SDK's own query at the view's centre
  const height = await elevation.queryElevation(view.center.clone(), { returnSampleInfo: true });
  result.centerHeight = height.geometry.z;
  // and the view's ground, as drawn, is made of it (without our layer it would be flat at 0 m)
  const sampler = view.groundView.elevationSampler;
  result.groundHeight = sampler ? sampler.queryElevation(view.center.clone()).z : null;
  result.ok = true;
}

run().catch((e) => {
  window.__result = { ok: false, error: String(e && (e.stack || e.message) || e), details: e && e.details };
  console.error("browser check failed:", e);
});
