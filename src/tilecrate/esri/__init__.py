"""The files ArcGIS describes a cache or package with, one module per file format, each holding the
reader and the writer of that file: `conf_xml` (conf.xml, conf.cdi, conf.properties), `root_json`
(root.json of .tpkx packages, V2 cache folders and .vtpk `p12/`), `mapserver_json` (a .tpk's
service description), `iteminfo` (iteminfo.xml, iteminfo.json, item.pkinfo); `common` holds what
they share (CacheMeta, ServiceExtents, number and XML text helpers).

This package sits just above tiling and errors: sources (readers of caches) and package (writers of
exports) both use it, and it imports neither.
"""
