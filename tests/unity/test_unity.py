"""Builds the Unity package's engine-free core (Loraloom.Core) and its NUnit suite with Debian's mono
`mcs`, and runs the suite with `nunit-console` against the session's live daemon. The Unity layer
(Runtime/Unity) is compiled against the API stubs and its own NUnit suite (UnityLayerTests.cs, on
a stand-in main thread) runs the same way.

Nothing is written into the repository: both assemblies go to a temporary folder. A missing `mcs`
or `nunit-console` is a failure, not a skip (`.ci/install-unity-deps.sh` installs both). The C#
counts are printed so CI logs show them, and the set of tests that ran is checked against the
suite's own test list, so a test that silently disappears fails this one.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "unity_package"
FRAMES = ROOT / "tests" / "fixtures" / "frames"
INSTALL_HINT = "install it with `bash .ci/install-unity-deps.sh`"

# Test methods of Tests/Core, by fixture. Methods parameterised by golden frame run once per frame.
PER_FRAME = {
    "GoldenFrameTests": [
        "GenericDecodeEqualsTheJsonValue",
        "GenericEncodeOfTheJsonValueEqualsTheBytes",
        "TypedDecodeThenEncodeGivesTheSameBytes",
        "TypedDecodeIgnoresFieldOrderAndUnknownFields",
    ],
}
SINGLE = {
    "GoldenFrameTests": [
        "EveryMessageTypeHasAGoldenFrame",
        "TypedFieldsCarryTheGoldenValues",
        "EveryErrorCodeHasItsMeaning",
        "CreateMakesEveryTypeName",
    ],
    "CodecTests": [
        "IntegersUseTheirSmallestForm",
        "StringsBinariesAndContainersUseTheirSmallestHeader",
        "MapsWrittenBeforeTheirCountIsKnownUseTheSmallestHeader",
        "FloatsAreAlwaysFloat64AndIntsReadAsDoubles",
        "SkipStepsOverNestedValues",
        "BadFramesAreRefusedWithProtocolCodes",
        "AdapterSpecsParseLikeThePythonClient",
    ],
    "RuntimeFileTests": [
        "TheEnvironmentVariableWins",
        "LinuxUsesXdgRuntimeDirThenLocalState",
        "ReadsTheLiveDaemonsFile",
        "MissingOrMalformedFilesSayDaemonNotFound",
        "ConnectingWithoutADaemonSaysDaemonNotFound",
    ],
    "LiveDaemonTests": [
        "HandshakeAnnouncesTheModelAndTheTestAdapters",
        "ListAdaptersReportsReadyTextAdapters",
        "StreamsOnTwoAdaptersAtOnce",
        "WithoutStreamingOnlyTheResultArrives",
        "CancellingMidStreamCancelsTheTaskAndTheRequest",
        "AlreadyCancelledTokenSendsNothing",
        "UnknownAdapterFaultsWithItsCode",
        "InvalidRequestFaultsWithBadMessage",
        "AThrowingTokenCallbackFaultsTheTask",
        "WrongTokenIsRefused",
        "ConnectsThroughTheRuntimeFile",
        "AddingAnAdapterFolderRaisesAnAdapterEvent",
        "GeneratesAnImageWhenTheDaemonHasAnImageModel",
    ],
    "LauncherTests": [
        "LauncherStartsADaemonAndFindsItThroughTheRuntimeFile",
        "LauncherUsesADaemonThatIsAlreadyRunning",
        "LauncherReportsADaemonThatCannotStart",
        "ArgumentsSurviveQuotingThroughARealProcess",
        "CommandLinesSplitLikeAShell",
        "ClientReconnectsAfterTheDaemonRestarts",
    ],
    "ConversationTests": [
        "A200TurnConversationKeepsAnsweringOnA256TokenContext",
        "HistorySavesAsPlainJsonAndRestores",
        "ConcurrentAsksAreAnsweredOneAtATimeInOrder",
        "AFailedLineChangesNothingAndTheLinesBehindItGoOn",
        "StopGenerationEndsTheLineWithWhatWasSaid",
        "ALineCancelledWhileWaitingForItsTurnLeavesTheOrder",
        "AHistoryReplacedDuringALineIsKept",
        "MaxHistoryTurnsAndKeepHistoryBoundWhatIsSent",
    ],
    "StructuredTests": [
        "SchemasDescribeThePublicFieldsOfAClass",
        "TheMapperFillsFieldsTheWayJsonUtilityDoes",
        "ASchemaCallReturnsJsonValidAgainstIt",
        "ATypedCallFillsTheClassWithinItsBounds",
        "ChoicesRegexesAndGrammarsShapeTheText",
        "ToolCallsComeBackAsData",
        "AnInvalidConstraintFaultsWithInvalidParameterAndTheConnectionGoesOn",
        "CancellingAConstrainedCallCancelsTheTaskAndTheRequest",
    ],
    "BudgetTests": [
        "ABudgetIsAnsweredKeptAndInForceUntilLifted",
        "FramesReportedAreCountedByTheDaemon",
        "MeasuredGameTimesSizeTheGamesPartAndBadOnesAreLeftOut",
        "ABudgetEndsWithItsConnection",
        "OutOfRangeValuesAreRefusedBeforeAnythingIsSent",
        "TheKeptBudgetGoesOutAgainAfterTheDaemonRestarts",
    ],
    "BundledRuntimeTests": [
        "TheRuntimeStartsWithThePackTheBuildCarries",
    ],
    "LifecycleTests": [
        "ALineAskedBeforeTheDaemonIsUpIsAnswered",
        "ALineWaitsOnlyAsLongAsRequestConnectWait",
        "ARestartWithSigtermKeepsTheWaitingLinesAndRaisesTheEvents",
        "ARestartAfterSigkillKeepsTheWaitingLinesAndRaisesTheEvents",
        "StopAsyncSendsSigtermAndKillsAfterTheGraceWithoutBlocking",
    ],
}
LONG_CONTEXT = 8192
TOOLS_CONTEXT = 2048
# The only test allowed not to run, and only when the daemon has no image model.
IMAGE_TEST = "LiveDaemonTests.GeneratesAnImageWhenTheDaemonHasAnImageModel"
NAMESPACE = "Loraloom.Core.Tests."
# A second daemon on the placeholder image model (needs diffusers) makes the image test run. Off while
# the daemon never answers generate_image: daemon/service.py reads `event.queued_ms` where the image
# engine's ImageDoneEvent has `event.timings.queued_ms`, and the request then hangs without an error.
RUN_IMAGE_DAEMON = True


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a long context (the same shapes, so the test adapters fit it)."""
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-long") / "model", "llama", max_positions=LONG_CONTEXT)


@pytest.fixture(scope="module")
def tools_url(live_daemon, long_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon on the test adapters (same token) with a 2048-token context: two tool definitions
    take ~450 tokens of the tiny model's small vocabulary, more than the session daemon's 256."""
    from support import serve_command, start_daemon, stop_daemon

    base = tmp_path_factory.mktemp("tools-daemon")
    runtime = base / "daemon.json"
    argv = serve_command(long_model, live_daemon.text_adapter_dir, runtime, token=live_daemon.token,
                         extra=["--max-context", str(TOOLS_CONTEXT)])
    proc = start_daemon(argv, runtime, base / "daemon.log")
    try:
        yield json.loads(runtime.read_text())["url"]
    finally:
        stop_daemon(proc)


@pytest.fixture(scope="module")
def game_pack(live_daemon, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A game pack (`loraloom pack`) of the tiny model and the test adapters, with the session
    daemon's settings: what a player build carries in StreamingAssets/Loraloom/pack."""
    pack = tmp_path_factory.mktemp("game-pack") / "pack"
    cmd = [sys.executable, "-m", "daemon", "pack", "--model", str(live_daemon.model_dir),
           "--adapters", str(live_daemon.text_adapter_dir), "--out", str(pack), "--image-model", "none",
           "--max-context", "256", "--max-seqs", "8", "--lora-slots", "4", "--max-lora-rank", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"loraloom pack failed:\n{proc.stdout}\n{proc.stderr}"
    assert (pack / "manifest.json").is_file()
    return pack


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"`{name}` is not installed: {INSTALL_HINT}"
    return path


def _nunit_framework() -> Path:
    found = sorted(glob.glob("/usr/lib/cli/nunit.framework-2.6*/nunit.framework.dll"))
    assert found, f"nunit.framework.dll (NUnit 2.6) is not installed: {INSTALL_HINT}"
    return Path(found[-1])


def _compile(mcs: str, out: Path, sources: Path, refs: list[str], defines: tuple[str, ...] = ()) -> None:
    files = sorted(str(p) for p in (sources.rglob("*.cs") if sources.is_dir() else [sources]))
    assert files, f"no C# sources under {sources}"
    cmd = [mcs, "-langversion:7.2", "-target:library", "-warnaserror+", "-nowarn:1591",
           f"-out:{out}", *(f"-define:{d}" for d in defines), *(f"-r:{r}" for r in refs), *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mcs failed for {sources.relative_to(ROOT)}:\n{proc.stdout}\n{proc.stderr}"


def test_unity_layer_type_checks_against_api_stubs(tmp_path: Path) -> None:
    """Runtime/Unity, Editor and Samples~ compile with mcs against stubs of the Unity API they use.

    The stubs (tests/unity/stubs) hold Unity 2021.3's documented signatures without behaviour: this
    catches C# errors in code that only Unity can build, not a wrong use of Unity at run time. The
    Unity layer is compiled twice: as for Unity 2021.3 and with UNITY_2023_1_OR_NEWER (the branch that
    uses FindFirstObjectByType).
    """
    mcs = _tool("mcs")
    stubs = Path(__file__).parent / "stubs"
    engine, editor = tmp_path / "UnityEngine.dll", tmp_path / "UnityEditor.dll"
    core, unity = tmp_path / "Loraloom.Core.dll", tmp_path / "Loraloom.Unity.dll"
    _compile(mcs, engine, stubs / "UnityEngine.cs", [])
    _compile(mcs, editor, stubs / "UnityEditor.cs", [str(engine)])
    _compile(mcs, core, PACKAGE / "Runtime" / "Core", ["System.Net.Http"])
    unity_refs = [str(core), str(engine), "System.Core"]
    _compile(mcs, tmp_path / "Loraloom.Unity.2023.dll", PACKAGE / "Runtime" / "Unity", unity_refs,
             defines=("UNITY_2023_1_OR_NEWER",))
    _compile(mcs, unity, PACKAGE / "Runtime" / "Unity", unity_refs)
    _compile(mcs, tmp_path / "Loraloom.Editor.dll", PACKAGE / "Editor",
             [str(core), str(unity), str(engine), str(editor), "System.Core"])
    _compile(mcs, tmp_path / "Samples.dll", PACKAGE / "Samples~", [str(core), str(unity), str(engine), "System.Core"])


# The Unity layer's behaviour, through the stubs (tests/unity/UnityLayerTests.cs).
LAYER_TESTS = {
    "NpcEventsArriveOnTheMainThreadBeforeTheAwaitResumes",
    "NpcRequestFailedCarriesTheCodeAndAMessageWithoutIt",
    "NpcConversationSavesAndLoads",
    "NpcStructuredAsksFireTheirEventsBeforeTheAwaitResumes",
    "NpcToolCallsFireToolCalledAndComeBack",
    "AThrowingListenerDoesNotStrandTheAwaitingCode",
    "GpuBudgetGoesOutOnConnectAndThePlayerLoopReportsFrames",
    "GpuBudgetReportsTheGpuTimeUnityMeasuredForTheLastFrame",
    "APlayerBuildCarriesTheRuntimeAndPackAndLaunchesThemFromThere",
    "DaemonRecoversFromAFailedStartAndRaisesItsConnectionEvents",
    "ALaunchedDaemonIsStoppedWithoutBlockingTheMainThread",
}


def test_unity_layer_behaves_against_a_live_daemon(live_daemon, tools_url: str, game_pack: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Runtime/Unity, compiled against the stubs (whose UnityEvents call their listeners), runs its
    NUnit suite under mono on a stand-in main thread: event order, error codes, the daemon
    component's recovery and connection events, stopping a launched daemon off the main thread."""
    mcs = _tool("mcs")
    nunit = _tool("nunit-console")
    framework = _nunit_framework()
    build = tmp_path / "layer"
    build.mkdir()
    stubs = Path(__file__).parent / "stubs"
    engine, core, unity = build / "UnityEngine.dll", build / "Loraloom.Core.dll", build / "Loraloom.Unity.dll"
    editor_stub, editor = build / "UnityEditor.dll", build / "Loraloom.Editor.dll"
    tests = build / "Loraloom.Unity.Tests.dll"
    _compile(mcs, engine, stubs / "UnityEngine.cs", [])
    _compile(mcs, editor_stub, stubs / "UnityEditor.cs", [str(engine)])
    _compile(mcs, core, PACKAGE / "Runtime" / "Core", ["System.Net.Http"])
    _compile(mcs, unity, PACKAGE / "Runtime" / "Unity", [str(core), str(engine), "System.Core"])
    _compile(mcs, editor, PACKAGE / "Editor", [str(core), str(unity), str(engine), str(editor_stub), "System.Core"])
    _compile(mcs, tests, Path(__file__).parent / "UnityLayerTests.cs",
             [str(core), str(unity), str(editor), str(engine), str(editor_stub), str(framework), "System.Core"])
    shutil.copy(framework, build / "nunit.framework.dll")
    serve = live_daemon.serve_command(runtime_file=Path("{runtime_file}"))
    loraloom = Path(sys.executable).with_name("loraloom")
    assert loraloom.is_file(), f"no `loraloom` console script beside {sys.executable} (pip install -e .)"
    env = dict(os.environ, LORALOOM_TEST_URL=live_daemon.url, LORALOOM_TEST_TOKEN=live_daemon.token,
               LORALOOM_TEST_TOOLS_URL=tools_url, LORALOOM_TEST_SERVE_ARGV="\n".join(serve),
               LORALOOM_TEST_PACK=str(game_pack), LORALOOM_TEST_LORALOOM=str(loraloom))
    env.pop("LORALOOM_RUNTIME_FILE", None)
    ran, failed, not_run, output, code = _nunit(nunit, tests, build, tmp_path / "layer-result.xml", env)
    with capsys.disabled():
        print(f"\nC# NUnit suite of Runtime/Unity (stubs): {len(ran)} passed, {len(failed)} failed, "
              f"{len(not_run)} skipped")
        for name, why in sorted(failed.items()):
            print(f"  FAILED: {name}: {why[:500]}")
    assert not failed, f"C# tests failed: {sorted(failed)}\n{output[-8000:]}"
    assert not not_run, f"C# tests that did not run: {not_run}"
    assert {n.removeprefix("UnityLayerTests.") for n in ran} == LAYER_TESTS
    assert code == 0, output[-6000:]


def _nunit(nunit: str, tests: Path, cwd: Path, result_xml: Path, env: dict[str, str]
           ) -> tuple[dict[str, str], dict[str, str], dict[str, str], str, int]:
    """Runs one NUnit assembly: (passed, failed, not run) by test name, the output, the exit code."""
    log = result_xml.with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.run([nunit, "-nologo", "-nodots", f"-xml={result_xml}", str(tests)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, timeout=540)
    output = log.read_text(errors="replace")
    assert result_xml.exists(), f"nunit-console wrote no result (exit {proc.returncode}):\n{output[-6000:]}"
    ran: dict[str, str] = {}
    failed: dict[str, str] = {}
    not_run: dict[str, str] = {}
    for case in ET.parse(result_xml).getroot().iter("test-case"):
        name = case.get("name", "").removeprefix(NAMESPACE).removeprefix("Loraloom.Unity.Tests.")
        reason = case.findtext("reason/message") or case.findtext("failure/message") or ""
        if case.get("executed") != "True":
            not_run[name] = reason.strip()
        elif case.get("success") == "True":
            ran[name] = case.get("time", "")
        else:
            failed[name] = reason.strip()
    return ran, failed, not_run, output, proc.returncode


def _expected_tests() -> set[str]:
    frames = sorted(p.stem for p in FRAMES.glob("*.msgpack"))
    assert frames, f"no golden frames in {FRAMES}"
    names = {f"{fixture}.{method}" for fixture, methods in SINGLE.items() for method in methods}
    names |= {f'{fixture}.{method}("{frame}")' for fixture, methods in PER_FRAME.items()
              for method in methods for frame in frames}
    return names


def test_unity_core_suite(live_daemon, long_model: Path, tools_url: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Core compiles with mcs (C# 7.2) and its whole NUnit suite passes against the live daemon."""
    mcs = _tool("mcs")
    nunit = _tool("nunit-console")
    framework = _nunit_framework()

    build = tmp_path / "build"
    build.mkdir()
    core = build / "Loraloom.Core.dll"
    tests = build / "Loraloom.Core.Tests.dll"
    _compile(mcs, core, PACKAGE / "Runtime" / "Core", ["System.Net.Http"])
    _compile(mcs, tests, PACKAGE / "Tests" / "Core", [str(core), str(framework), "System.Core"])
    shutil.copy(framework, build / "nunit.framework.dll")

    image_env = {}
    image_proc = None
    if RUN_IMAGE_DAEMON and importlib.util.find_spec("diffusers") is not None:
        from support import start_daemon, stop_daemon

        image_runtime = tmp_path / "image-daemon.json"
        argv = live_daemon.serve_command(image_runtime, 0, ["--image-model", "default"])
        image_proc = start_daemon(argv, image_runtime, tmp_path / "image-daemon.log", timeout=180)
        info = json.loads(image_runtime.read_text())
        image_env = {"LORALOOM_TEST_IMAGE_URL": info["url"], "LORALOOM_TEST_IMAGE_TOKEN": info["token"]}
    try:
        _run_suite(live_daemon, long_model, tmp_path, capsys, build, tests, nunit,
                   {**image_env, "LORALOOM_TEST_TOOLS_URL": tools_url})
    finally:
        if image_proc is not None:
            stop_daemon(image_proc)


def _run_suite(live_daemon, long_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], build: Path,
               tests: Path, nunit: str, extra_env: dict[str, str]) -> None:
    serve = live_daemon.serve_command(runtime_file=Path("{runtime_file}"))
    # The tiny model with a long context, for lines that must still be streaming when a daemon is
    # stopped under them (LifecycleTests).
    from support import serve_command

    long_serve = serve_command(long_model, live_daemon.text_adapter_dir, Path("{runtime_file}"),
                               token=live_daemon.token,
                               extra=["--max-context", str(LONG_CONTEXT), "--max-new-tokens", str(LONG_CONTEXT)])
    env = dict(
        os.environ,
        LORALOOM_TEST_URL=live_daemon.url,
        LORALOOM_TEST_TOKEN=live_daemon.token,
        LORALOOM_TEST_RUNTIME_FILE=str(live_daemon.runtime_file),
        LORALOOM_TEST_ADAPTER_DIR=str(live_daemon.text_adapter_dir),
        LORALOOM_TEST_FRAMES=str(FRAMES),
        LORALOOM_TEST_SERVE_COMMAND=json.dumps(serve),
        LORALOOM_TEST_LONG_SERVE_COMMAND=json.dumps(long_serve),
        **extra_env,
    )
    env.pop("LORALOOM_RUNTIME_FILE", None)
    ran, failed, not_run, output, code = _nunit(nunit, tests, build, tmp_path / "nunit-result.xml", env)

    with capsys.disabled():
        print()
        print("C# NUnit suite of unity_package (Loraloom.Core):")
        print(f"unity: {len(ran)} passed, {len(failed)} failed, {len(not_run)} skipped")
        for name, why in sorted(not_run.items()):
            print(f"  not run: {name}: {why}")
        for name, why in sorted(failed.items()):
            print(f"  FAILED: {name}: {why[:500]}")

    assert not failed, f"C# tests failed: {sorted(failed)}\n{output[-8000:]}"
    # The image test may only be left out for its own stated reason: the daemon has no image model.
    allowed_not_run = {IMAGE_TEST} if "no image model" in not_run.get(IMAGE_TEST, "") else set()
    assert set(not_run) <= allowed_not_run, f"C# tests that did not run: {not_run}"
    assert set(ran) | set(not_run) == _expected_tests(), (
        f"unexpected C# test set: missing {sorted(_expected_tests() - set(ran) - set(not_run))}, "
        f"extra {sorted(set(ran) | set(not_run) - _expected_tests())}")
    assert code == 0, f"nunit-console exited {code}:\n{output[-6000:]}"

