#!/bin/sh
# Copy the dashboard's JavaScript libraries from node_modules (exact versions pinned in
# package.json / package-lock.json; `npm ci` first, or `make vendor`) into static/vendor/,
# each with its licence. The copies are committed: users need no npm and no build step.
set -eu
cd "$(dirname "$0")/../.."
out=goflow/web/static/vendor
mkdir -p "$out"
version() { node -p "require('./node_modules/$1/package.json').version"; }
cp node_modules/cytoscape/dist/cytoscape.min.js "$out/cytoscape.min.js"
cp node_modules/cytoscape/LICENSE "$out/cytoscape.LICENSE"
# cytoscape-dagre's dist bundles @dagrejs/dagre (and its graphlib): both licences travel with it.
cp node_modules/cytoscape-dagre/dist/cytoscape-dagre.min.js "$out/cytoscape-dagre.min.js"
cp node_modules/cytoscape-dagre/LICENSE "$out/cytoscape-dagre.LICENSE"
cp node_modules/@dagrejs/dagre/LICENSE "$out/dagre.LICENSE"
{
  echo "Vendored by goflow/web/vendor.sh from npm (package-lock.json pins them):"
  echo "cytoscape $(version cytoscape) (MIT) cytoscape.min.js"
  echo "cytoscape-dagre $(version cytoscape-dagre) (MIT), bundling @dagrejs/dagre (MIT) cytoscape-dagre.min.js"
  echo "@dagrejs/dagre $(version @dagrejs/dagre): licence only (its code is inside cytoscape-dagre.min.js)"
} > "$out/VERSIONS.txt"
