#!/usr/bin/env python3
"""Validates secrets.iomete.com objects against the CRDs' openAPIV3Schema (jsonschema), strictly:
unknown fields are errors (the API server would silently prune them). Also checks that every
object has apiVersion, kind and metadata.name.

usage: validate_custom_resources.py CRD_DIR FILE.yaml...
"""
import copy
import pathlib
import sys

import jsonschema
import yaml


def strict(schema):
    """OpenAPI v3 (structural) -> JSON Schema that rejects unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        for key in [k for k in node if k.startswith("x-kubernetes-")]:
            if key == "x-kubernetes-preserve-unknown-fields":
                node["additionalProperties"] = True
            del node[key]
        if node.get("format") in ("int32", "int64"):
            del node["format"]
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            walk(child)
        walk(node.get("items"))
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])

    walk(schema)
    # metadata is validated by the API server itself.
    schema.get("properties", {}).get("metadata", {}).pop("additionalProperties", None)
    return schema


def load_crds(crd_dir):
    schemas = {}
    for path in sorted(pathlib.Path(crd_dir).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                api_version = f"{spec['group']}/{version['name']}"
                schema = strict(version["schema"]["openAPIV3Schema"])
                jsonschema.Draft7Validator.check_schema(schema)
                schemas[(api_version, spec["names"]["kind"])] = schema
    if not schemas:
        sys.exit(f"no CustomResourceDefinition found in {crd_dir}")
    return schemas


def main():
    crd_dir, files = sys.argv[1], sys.argv[2:]
    schemas = load_crds(crd_dir)
    failures = checked = 0
    for name in files:
        for index, doc in enumerate(yaml.safe_load_all(pathlib.Path(name).read_text())):
            if not doc:
                continue
            where = f"{name} document {index}"
            if not doc.get("apiVersion") or not doc.get("kind") or not doc.get("metadata", {}).get("name"):
                print(f"ERROR {where}: missing apiVersion, kind or metadata.name")
                failures += 1
                continue
            key = (doc["apiVersion"], doc["kind"])
            if not doc["apiVersion"].startswith("secrets.iomete.com/"):
                continue
            if key not in schemas:
                print(f"ERROR {where}: no CRD serves {key[1]} in {key[0]}")
                failures += 1
                continue
            errors = sorted(jsonschema.Draft7Validator(schemas[key]).iter_errors(doc), key=str)
            for error in errors:
                path = ".".join(str(p) for p in error.absolute_path)
                print(f"ERROR {where} ({key[1]} {doc['metadata']['name']}): {path}: {error.message}")
            failures += bool(errors)
            checked += 1
    print(f"custom resources: {checked} checked against {len(schemas)} CRD versions, {failures} invalid")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
