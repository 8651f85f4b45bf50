"""The shape of the ``edge-sdk`` command line: every leaf command registered once by its group module, ``--help``
for every group, one spelling per shared concept, and the old spellings still working as deprecated aliases."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from edge_sdk.bundle import Artifact, Bundle, Manifest, Validation, sha256_path
from edge_sdk.cli import _common, build_parser, main

LEAVES = {
    "convert", "build", "benchmark", "check", "agent run", "targets", "inspect", "verify", "archive", "keys new",
    "bundle sign", "bundle verify", "registry add", "registry list", "registry show", "registry promote",
    "registry holdout", "registry serve", "deploy", "rollback", "collector run", "fleet status", "fleet simulate",
    "distill", "prune", "pipeline run", "pipeline serve", "pipeline check", "web serve",
    "data export", "data label",
}
GROUP_MODULE = {"convert": "convert", "build": "convert", "benchmark": "convert", "check": "convert",
                "agent": "agent", "targets": "targets", "inspect": "bundle", "verify": "bundle", "archive": "bundle",
                "keys": "bundle", "bundle": "bundle", "registry": "registry", "deploy": "registry",
                "rollback": "registry", "collector": "collector", "fleet": "fleet", "distill": "optimize",
                "prune": "optimize", "pipeline": "pipeline", "web": "web", "data": "data"}
#: (old spelling, canonical spelling) -> a command line using the canonical spelling (the alias replaces it)
ALIAS_CASES = {
    ("--keys", "--trusted-keys"): ["bundle", "verify", "B", "--trusted-keys", "trust"],
    ("--store", "--registry-dir"): ["registry", "list", "--registry-dir", "reg"],
    ("--store", "--model-store"): ["agent", "run", "--bundle", "B", "--model-store", "models"],
    ("--store", "--save-results"): ["benchmark", "B", "--save-results"],
    ("--tolerance", "--max-accuracy-drop"): ["registry", "promote", "m", "2", "--max-accuracy-drop", "1.5"],
    ("--version", "--model-version"): ["convert", "m.onnx", "--out", "o", "--model-version", "3"],
}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
          inherited: dict | None = None) -> Iterator[tuple[str, argparse.ArgumentParser, dict]]:
    """(command path, leaf parser, defaults seen on the way down) for every leaf, one entry per registration."""
    defaults = {**(inherited or {}), **parser._defaults}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser, defaults
    for action in subs:
        for pseudo in action._choices_actions:  # one per add_parser call, even for a repeated name
            yield from _walk(action.choices[pseudo.dest], (*path, pseudo.dest), defaults)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS]


def test_every_leaf_command_is_registered_once_by_its_group_module() -> None:
    found = list(_walk(build_parser()))
    names = [path for path, _, _ in found]
    assert len(names) == len(set(names)) == len(LEAVES), sorted(names)
    assert set(names) == LEAVES
    funcs = {}
    for path, _, defaults in found:
        func = defaults["func"]
        assert func.__module__ == f"edge_sdk.cli.{GROUP_MODULE[path.split()[0]]}", path
        assert func.__name__ != "_usage", f"{path} has no handler of its own"
        funcs[path] = func
    assert len(set(funcs.values())) == len(LEAVES)  # one handler per leaf


def test_console_script_and_module_entry_points() -> None:
    [ep] = [ep for ep in entry_points(group="console_scripts") if ep.name == "edge-sdk"]
    assert ep.value == "edge_sdk.cli:main" and ep.load() is main
    proc = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "registry", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: edge-sdk registry"), proc.stderr


@pytest.mark.parametrize("group", sorted(GROUP_MODULE))
def test_group_help(group: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([group, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: edge-sdk {group}"), out


def test_group_without_action_is_a_one_line_usage_error(capsys: pytest.CaptureFixture) -> None:
    for group in ("keys", "bundle", "registry", "collector", "fleet", "agent"):
        assert main([group]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: usage: edge-sdk") and "\n" not in err, (group, err)


def test_shared_concepts_have_one_spelling_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_SDK_MQTT", "mqtt://broker.example:1883")
    monkeypatch.setenv("EDGE_SDK_DB", "sqlite:///env.db")
    canonical = {"json": {"--json"}, "mqtt": {"--mqtt"}, "trusted_keys": {"--trusted-keys"}, "db": {"--db"},
                 "model_version": {"--model-version"}, "store": {"--registry-dir", "--model-store"},
                 "log_level": {"--log-level", "--verbose", "-v"}, "allow_unsigned": {"--allow-unsigned"},
                 "rollback_key": {"--rollback-key"}, "version_code": {"--version-code"}, "fleets": {"--fleet"}}
    old = {o for o, _ in _common.DEPRECATED_ALIASES}
    seen: dict[str, list[str]] = {dest: [] for dest in canonical}
    helps: dict[str, set[str]] = {}
    for path, leaf, _ in _walk(build_parser()):
        opts = _options(leaf)
        strings = {s for a in opts for s in a.option_strings}
        assert {"--log-level", "--verbose"} <= strings, f"{path}: no --log-level/--verbose"
        hidden = {s for a in leaf._actions if a.help is argparse.SUPPRESS for s in a.option_strings}
        assert hidden <= old, f"{path}: hidden options that are not registered aliases: {hidden - old}"
        for a in opts:
            if a.dest in canonical:
                assert set(a.option_strings) <= canonical[a.dest], (path, a.option_strings)
                seen[a.dest].append(path)
                if a.dest in ("json", "log_level"):
                    continue
                helps.setdefault(a.option_strings[0], set()).add(a.help)
            if "--mqtt" in a.option_strings:  # every command reads $EDGE_SDK_MQTT, the agent too
                assert a.default == "mqtt://broker.example:1883" and "$EDGE_SDK_MQTT" in a.help, path
            if "--db" in a.option_strings:
                assert a.default == "sqlite:///env.db", path
            if "--trusted-keys" in a.option_strings:
                assert isinstance(a, argparse._AppendAction), path
            if "--max-accuracy-drop" in a.option_strings:
                assert a.type is float and a.metavar == "PP", path
        # the old spellings that meant something else are gone from every help text
        assert not strings & {"--keys", "--store"}, path
        if "--version" in strings:
            pytest.fail(f"{path}: --version is the program's version only")
    assert set(seen["mqtt"]) == {"agent run", "deploy", "rollback", "collector run", "fleet simulate"}
    assert set(seen["trusted_keys"]) == {"agent run", "bundle verify", "registry add"}
    assert set(seen["db"]) == {"registry add", "registry list", "registry show", "registry promote",
                               "registry holdout", "registry serve", "deploy", "rollback", "collector run",
                               "fleet status", "data export", "data label"}
    assert len(seen["json"]) >= 10
    # issue 13's flags: one parent each, so one spelling and one help text wherever they appear
    assert set(seen["allow_unsigned"]) == {"agent run", "registry promote", "deploy"}
    assert set(seen["rollback_key"]) == {"deploy", "rollback"}
    assert set(seen["version_code"]) == set(seen["fleets"]) == {"convert", "build", "bundle sign"}
    for flag in ("--db", "--trusted-keys", "--registry-dir", "--model-version", "--allow-unsigned", "--rollback-key",
                 "--version-code"):
        assert len(helps[flag]) == 1, (flag, helps[flag])  # one definition, shared through a parent parser


def test_every_alias_is_covered_and_parses_like_its_canonical_flag() -> None:
    parser = build_parser()
    assert set(ALIAS_CASES) == _common.DEPRECATED_ALIASES
    for (old, new), argv in ALIAS_CASES.items():
        new_args = vars(parser.parse_args(argv))
        old_args = vars(parser.parse_args([old if a == new else a for a in argv]))
        notices = old_args.pop(_common.NOTICES)
        assert notices == [f"{old} is deprecated: use {new}"]
        assert old_args == new_args and _common.NOTICES not in new_args, (old, new)
    twice = vars(parser.parse_args(["bundle", "verify", "B", "--keys", "a", "--keys", "b"]))
    assert twice["trusted_keys"] == ["a", "b"] and len(twice[_common.NOTICES]) == 1


def test_required_flag_is_satisfied_by_its_alias_and_named_when_missing(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bundle", "verify", "B"])
    assert "--trusted-keys" in capsys.readouterr().err


@pytest.fixture
def signed(tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[Path, Path]:
    """A real bundle signed with a key made by ``edge-sdk keys new``; its trust directory."""
    root = tmp_path / "b"
    (root / "onnx").mkdir(parents=True)
    f = root / "onnx" / "fp32.onnx"
    f.write_bytes(b"model-bytes")
    art = Artifact("onnx", "fp32", "onnx/fp32.onnx", sha256_path(f), f.stat().st_size,
                   validation=Validation(passed=True, cosine=1.0))
    Bundle(root, Manifest(name="m", version="1", source={"framework": "onnx", "file": "m.onnx", "sha256": "0" * 64},
                          artifacts=[art])).save()
    assert main(["keys", "new", "--dir", str(tmp_path / "keys"), "--name", "k"]) == 0
    assert main(["bundle", "sign", str(root), "--key", str(tmp_path / "keys" / "k.key")]) == 0
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "k.pub.pem").write_bytes((tmp_path / "keys" / "k.pub.pem").read_bytes())
    capsys.readouterr()
    return root, trust


def test_old_keys_flag_verifies_like_the_new_one_with_one_notice(signed: tuple[Path, Path],
                                                                 capsys: pytest.CaptureFixture) -> None:
    root, trust = signed
    assert main(["bundle", "verify", str(root), "--trusted-keys", str(trust)]) == 0
    new = capsys.readouterr()
    assert new.out.startswith("ok: ") and new.err == ""
    assert main(["bundle", "verify", str(root), "--keys", str(trust)]) == 0
    old = capsys.readouterr()
    assert old.out == new.out and old.err == "--keys is deprecated: use --trusted-keys\n"
    (root / "onnx" / "fp32.onnx").write_bytes(b"tampered")  # a refusal stays one line: the error
    assert main(["bundle", "verify", str(root), "--keys", str(trust)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not match its sha256" in err[0]


def test_old_store_flag_of_the_registry_in_a_real_process(signed: tuple[Path, Path], tmp_path: Path) -> None:
    root, trust = signed
    db = f"sqlite:///{tmp_path / 'fleet.db'}"

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge_sdk.cli", *argv, "--db", db], capture_output=True,
                              text=True, timeout=120, check=False)

    add = run("registry", "add", str(root), "--store", str(tmp_path / "reg"), "--trusted-keys", str(trust))
    assert add.returncode == 0, add.stderr
    assert add.stderr.strip().splitlines() == ["--store is deprecated: use --registry-dir"]
    assert "m:1: candidate" in add.stdout and (tmp_path / "reg").is_dir()
    listed = run("registry", "list", "--json", "--registry-dir", str(tmp_path / "reg"))
    assert listed.returncode == 0 and listed.stderr == "" and json.loads(listed.stdout)[0]["version"] == "1"
    missing = run("registry", "show", "m:7", "--store", str(tmp_path / "reg"))  # failure: the error line only
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1


def _help(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def test_convert_to_help_comes_from_the_converter_registry(capsys: pytest.CaptureFixture) -> None:
    """``--to`` lists what the registered converters produce, computed when help is shown: a converter that is
    unregistered disappears from the help with no edit in the CLI (a plugin's target would appear the same way)."""
    from edge_sdk.converters import register, target_formats
    from edge_sdk.converters.registry import registered_classes, unregister
    from edge_sdk.formats import Format

    listed = ", ".join(f.value for f in target_formats())
    assert Format.COREML in target_formats()
    assert f"from: {listed} (onnx also writes .ort" in _help(["convert"], capsys)
    coreml = {key: cls for key, cls in registered_classes().items() if key[1] is Format.COREML}
    try:
        for key in coreml:
            unregister(*key)
        text = _help(["convert"], capsys)
        assert "from: " in text and "coreml" not in text.split("from: ")[1].split(";")[0], text
    finally:
        for cls in coreml.values():
            register(cls, overwrite=True)
    assert Format.COREML in target_formats()


PLUGINS = Path(__file__).resolve().parent / "plugins"


@pytest.mark.parametrize("with_plugin", [True, False])
def test_agent_runtime_help_lists_plugin_runtimes(with_plugin: bool) -> None:
    """``agent run --runtime`` help names every registered runtime; the test plugin (tests/plugins, an entry point
    of group ``edge_sdk.runtimes``) appears with no edit to the CLI, and only when it is installed."""
    import os

    env = {**os.environ, "PYTHONPATH": str(PLUGINS) if with_plugin else ""}
    proc = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "agent", "run", "--help"], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "--runtime NAME,NAME,... runtime preference order, comma-separated, from: " in text, text
    listed = text.split("from: ")[1].split(" (default")[0].split(", ")
    assert {"onnxruntime", "openvino", "litert", "coreml"} <= set(listed)
    assert ("echo" in listed) is with_plugin, listed


def test_a_command_line_that_needs_no_help_loads_no_registry() -> None:
    """The registry-derived help is computed only by --help: building the parser (every command's start) imports
    neither the converters nor the runtimes."""
    code = ("import sys\nfrom edge_sdk.cli import build_parser\nbuild_parser().parse_args(['agent', 'run', "
            "'--bundle', 'b'])\nprint(sorted(m for m in sys.modules if m.startswith(('edge_sdk.converters', "
            "'edge_sdk.runtimes'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)
