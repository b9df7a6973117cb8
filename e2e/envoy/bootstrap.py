#!/usr/bin/env python3
"""Fills e2e/envoy/bootstrap.json: an Envoy standing in for a workload's sidecar, whose HTTP
filter chain is the Wasm filter taken from a generated EnvoyFilter, and whose cache cluster
reaches the operator on loopback.

usage: bootstrap.py ENVOYFILTER_JSON LISTEN_PORT ADMIN_PORT CACHE_PORT > envoy.json
"""
import json
import pathlib
import sys

ef_path, listen, admin, cache = sys.argv[1:5]
ef = json.load(open(ef_path))
wasm = ef["spec"]["configPatches"][0]["patch"]["value"]
cluster = wasm["typed_config"]["config"]["vm_config"]["code"]["remote"]["http_uri"]["cluster"]
template = pathlib.Path(__file__).with_name("bootstrap.json").read_text()
values = {"__ADMIN_PORT__": int(admin), "__LISTEN_PORT__": int(listen),
          "__CACHE_PORT__": int(cache), "__CACHE_CLUSTER__": cluster, "__WASM_FILTER__": wasm}


def fill(node):
    if isinstance(node, dict):
        return {k: fill(v) for k, v in node.items()}
    if isinstance(node, list):
        return [fill(v) for v in node]
    return values.get(node, node) if isinstance(node, str) else node


json.dump(fill(json.loads(template)), sys.stdout)
