"""Checks the Unity package's layout without Unity: package.json, assembly definitions, the
engine-free core, and one .meta file per asset (Unity ignores assets without one in an immutable
package, such as one added by git URL).

`python tests/unity/test_package.py --write-meta` creates the missing .meta files, with GUIDs derived
from the asset's path so that regenerating them never changes an existing one.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "unity_package"

IMPORTERS = {
    ".cs": "MonoImporter",
    ".asmdef": "AssemblyDefinitionImporter",
    ".md": "TextScriptImporter",
    ".json": "TextScriptImporter",
}


def _assets() -> list[Path]:
    """Files and folders Unity imports: everything but hidden names and `~` folders (and their contents)."""
    found = []
    for path in sorted(PACKAGE.rglob("*")):
        parts = path.relative_to(PACKAGE).parts
        if any(p.startswith(".") or p.endswith("~") for p in parts) or path.suffix == ".meta":
            continue
        found.append(path)
    return found


def _guid(path: Path) -> str:
    return hashlib.md5(f"com.loraloom.unity/{path.relative_to(PACKAGE).as_posix()}".encode()).hexdigest()


def _meta_text(path: Path) -> str:
    head = f"fileFormatVersion: 2\nguid: {_guid(path)}\n"
    tail = "  externalObjects: {}\n  userData: \n  assetBundleName: \n  assetBundleVariant: \n"
    if path.is_dir():
        return head + "folderAsset: yes\nDefaultImporter:\n" + tail
    if path.name == "package.json":
        return head + "PackageManifestImporter:\n" + tail
    importer = IMPORTERS.get(path.suffix, "DefaultImporter")
    if importer == "MonoImporter":
        return (head + "MonoImporter:\n  externalObjects: {}\n  serializedVersion: 2\n  defaultReferences: []\n"
                "  executionOrder: 0\n  icon: {instanceID: 0}\n  userData: \n  assetBundleName: \n"
                "  assetBundleVariant: \n")
    return head + f"{importer}:\n" + tail


def write_missing_meta() -> list[Path]:
    written = []
    for asset in _assets():
        meta = asset.with_name(asset.name + ".meta")
        if not meta.exists():
            meta.write_text(_meta_text(asset))
            written.append(meta)
    return written


def test_package_manifest() -> None:
    """package.json is a valid UPM manifest whose samples exist."""
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert manifest["name"] == "com.loraloom.unity"
    assert re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"])
    assert manifest["unity"] == "2021.3"
    assert manifest["displayName"] and manifest["description"]
    assert len(manifest["samples"]) >= 2
    for sample in manifest["samples"]:
        folder = PACKAGE / sample["path"]
        assert sample["path"].startswith("Samples~/") and folder.is_dir(), sample
        assert list(folder.glob("*.cs")), f"{folder} has no script"
    for name in ("README.md", "CHANGELOG.md", "LICENSE.md"):
        assert (PACKAGE / name).is_file(), name
    assert "Apache License" in (PACKAGE / "LICENSE.md").read_text()
    assert list((PACKAGE / "Documentation~").glob("*.md"))
    # Platforms: desktop with a local daemon, mobile with a remote one, no WebGL; said in the
    # manifest and the README, and enforced by the assemblies.
    assert set(manifest["supportedPlatforms"]) == {"desktop", "mobile", "webgl"}
    assert "not supported" in manifest["supportedPlatforms"]["webgl"]
    readme = (PACKAGE / "README.md").read_text()
    assert "## Platforms" in readme and "WebGL" in readme


def test_assembly_definitions() -> None:
    """Each asmdef is named like its namespace, and every script in it declares that namespace."""
    asmdefs = {p: json.loads(p.read_text()) for p in PACKAGE.rglob("*.asmdef")}
    by_name = {d["name"]: p for p, d in asmdefs.items()}
    assert set(by_name) == {"Loraloom.Core", "Loraloom.Unity", "Loraloom.Editor", "Loraloom.Core.Tests"}
    assert asmdefs[by_name["Loraloom.Core"]]["noEngineReferences"] is True
    assert asmdefs[by_name["Loraloom.Core"]]["references"] == []
    assert asmdefs[by_name["Loraloom.Editor"]]["includePlatforms"] == ["Editor"]
    for runtime in ("Loraloom.Core", "Loraloom.Unity"):
        assert asmdefs[by_name[runtime]]["excludePlatforms"] == ["WebGL"], runtime
    for path, definition in asmdefs.items():
        assert definition["rootNamespace"] == definition["name"]
        for script in path.parent.rglob("*.cs"):
            namespaces = set(re.findall(r"^namespace\s+([\w.]+)", script.read_text(), re.M))
            if script.name == "AssemblyInfo.cs":
                continue  # assembly attributes only
            assert namespaces == {definition["name"]}, f"{script.relative_to(PACKAGE)}: {namespaces}"


def test_core_has_no_engine_references() -> None:
    """Loraloom.Core compiles outside Unity: no UnityEngine or UnityEditor anywhere in it."""
    for script in (PACKAGE / "Runtime" / "Core").rglob("*.cs"):
        text = script.read_text()
        assert not re.search(r"\bUnity(Engine|Editor)\b", text), script.relative_to(PACKAGE)


def test_every_asset_has_one_meta_file() -> None:
    """Every imported file and folder has a .meta with a unique GUID, and no .meta is orphaned."""
    assets = _assets()
    missing = [a.relative_to(PACKAGE) for a in assets if not a.with_name(a.name + ".meta").exists()]
    fix = f"python {Path(__file__).relative_to(ROOT)} --write-meta"
    assert not missing, f"assets without .meta (run `{fix}`): {missing}"
    guids: dict[str, Path] = {}
    for meta in PACKAGE.rglob("*.meta"):
        asset = meta.with_name(meta.name[: -len(".meta")])
        assert asset.exists(), f"orphaned {meta.relative_to(PACKAGE)}"
        match = re.search(r"^guid: ([0-9a-f]{32})$", meta.read_text(), re.M)
        assert match, f"{meta.relative_to(PACKAGE)} has no guid"
        assert match.group(1) not in guids, f"{meta} and {guids[match.group(1)]} share a guid"
        guids[match.group(1)] = meta


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-meta"]:
        for meta in write_missing_meta():
            print(meta.relative_to(ROOT))
    else:
        print(__doc__)
