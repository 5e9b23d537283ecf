using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Reflection;
using System.Threading;
using System.Threading.Tasks;
using Loraloom.Core;
using NUnit.Framework;

namespace Loraloom.Unity.Tests
{
    /// <summary>
    /// A stand-in for Unity's main thread: a thread with a SynchronizationContext that, frame after
    /// frame, runs the continuations posted to it and then MainThreadDispatcher's Update, as Unity's
    /// player loop does. Components are made with `new` (the stubs allow it) and their Unity
    /// messages (Start, OnDestroy) called by reflection, on this thread.
    /// </summary>
    sealed class FrameLoop : SynchronizationContext, IDisposable
    {
        readonly BlockingCollection<Action> _work = new BlockingCollection<Action>();
        readonly Thread _thread;
        volatile bool _stopping;

        public int ThreadId { get; private set; }

        public FrameLoop()
        {
            var started = new ManualResetEventSlim();
            _thread = new Thread(() =>
            {
                SetSynchronizationContext(this);
                ThreadId = Thread.CurrentThread.ManagedThreadId;
                typeof(MainThreadDispatcher).GetMethod("Install", BindingFlags.NonPublic | BindingFlags.Static).Invoke(null, null);
                var dispatcher = new MainThreadDispatcher();
                MethodInfo update = typeof(MainThreadDispatcher).GetMethod("Update", BindingFlags.NonPublic | BindingFlags.Instance);
                started.Set();
                while (!_stopping)
                {
                    Action item;
                    while (_work.TryTake(out item)) item();
                    update.Invoke(dispatcher, null);
                    if (_work.TryTake(out item, 5)) item();
                }
            }) { IsBackground = true, Name = "unity main thread (stand-in)" };
            _thread.Start();
            started.Wait();
        }

        public bool OnLoop { get { return Thread.CurrentThread.ManagedThreadId == ThreadId; } }

        public override void Post(SendOrPostCallback d, object state) { _work.Add(() => d(state)); }

        public override void Send(SendOrPostCallback d, object state)
        {
            if (OnLoop)
            {
                d(state);
                return;
            }
            var done = new ManualResetEventSlim();
            Post(s => { try { d(s); } finally { done.Set(); } }, state);
            done.Wait();
        }

        /// <summary>Runs <paramref name="body"/> on the loop; its Task.</summary>
        public Task<T> Start<T>(Func<Task<T>> body)
        {
            var started = new TaskCompletionSource<Task<T>>();
            Post(s =>
            {
                try { started.SetResult(body()); }
                catch (Exception e) { started.SetException(e); }
            }, null);
            return started.Task.Unwrap();
        }

        /// <summary>Runs <paramref name="body"/> on the loop and waits for its Task (at most <paramref name="limit"/>).</summary>
        public T Await<T>(Func<Task<T>> body, TimeSpan? limit = null)
        {
            Task<T> task = Start(body);
            TimeSpan wait = limit ?? TimeSpan.FromSeconds(60);
            if (!((IAsyncResult)task).AsyncWaitHandle.WaitOne(wait)) Assert.Fail("no end within " + wait.TotalSeconds + " s");
            return task.GetAwaiter().GetResult();
        }

        public void Run(Action body) { Await(() => { body(); return Task.FromResult(true); }); }

        public void Dispose()
        {
            _stopping = true;
            _thread.Join(5000);
        }
    }

    /// <summary>
    /// Loraloom.Unity's components against a real daemon, under mono, through the UnityEngine stubs:
    /// event order on the main thread, errors without doubled codes, a daemon component that recovers
    /// from a failed start and raises its connection events, and a launched daemon stopped without
    /// blocking the main thread.
    /// </summary>
    [TestFixture]
    public class UnityLayerTests
    {
        FrameLoop _loop;
        readonly List<LoraloomDaemon> _daemons = new List<LoraloomDaemon>();

        [SetUp]
        public void StartLoop() { _loop = new FrameLoop(); }

        [TearDown]
        public void StopLoop()
        {
            foreach (LoraloomDaemon daemon in _daemons) _loop.Run(() => Call(daemon, "OnDestroy"));
            _daemons.Clear();
            _loop.Dispose();
        }

        static string Env(string name)
        {
            string value = Environment.GetEnvironmentVariable(name);
            if (string.IsNullOrEmpty(value)) Assert.Fail(name + " is not set (run through tests/unity/test_unity.py)");
            return value;
        }

        /// <summary>The argv that starts another daemon (one argument a line), for <paramref name="runtimeFile"/>.</summary>
        static List<string> ServeCommand(string runtimeFile)
        {
            return Env("LORALOOM_TEST_SERVE_ARGV").Split('\n')
                .Select(a => a.Replace("{runtime_file}", runtimeFile).Replace("{port}", "0")).ToList();
        }

        static string TempDir()
        {
            string dir = Path.Combine(Path.GetTempPath(), "loraloom-unity-" + Guid.NewGuid().ToString("N").Substring(0, 12));
            Directory.CreateDirectory(dir);
            return dir;
        }

        static void Set(object target, string field, object value)
        {
            FieldInfo info = target.GetType().GetField(field, BindingFlags.NonPublic | BindingFlags.Instance);
            Assert.IsNotNull(info, field);
            info.SetValue(target, value);
        }

        static void Call(object target, string method)
        {
            target.GetType().GetMethod(method, BindingFlags.NonPublic | BindingFlags.Instance).Invoke(target, null);
        }

        LoraloomDaemon Daemon(string url = null, string token = null, string runtimeFile = null, float connectWait = 30f)
        {
            var daemon = new LoraloomDaemon { enabled = true };
            Set(daemon, "launchIfNotRunning", false);
            Set(daemon, "url", url ?? "");
            Set(daemon, "token", token ?? "");
            Set(daemon, "runtimeFile", runtimeFile ?? "");
            Set(daemon, "requestConnectWaitSeconds", connectWait);
            _daemons.Add(daemon);
            return daemon;
        }

        static LoraloomNpc Npc(LoraloomDaemon daemon, string adapter, int maxTokens)
        {
            var npc = new LoraloomNpc { adapter = adapter, maxTokens = maxTokens, systemPrompt = "You are a test NPC." };
            npc.Daemon = daemon;
            return npc;
        }

        [Test]
        public void NpcEventsArriveOnTheMainThreadBeforeTheAwaitResumes()
        {
            LoraloomNpc npc = Npc(Daemon(Env("LORALOOM_TEST_URL"), Env("LORALOOM_TEST_TOKEN")), "alpha", 24);
            npc.seed = 5;
            npc.priority = LinePriority.Player;
            var log = new List<string>();
            var chunks = new List<string>();
            bool offLoop = false;
            npc.ResponseUpdated.AddListener(chunk =>
            {
                offLoop |= !_loop.OnLoop;
                chunks.Add(chunk);
                log.Add("updated");
            });
            npc.ResponseFinished.AddListener(text =>
            {
                offLoop |= !_loop.OnLoop;
                log.Add("finished");
            });
            string reply = _loop.Await(async () =>
            {
                string text = await npc.AskAsync("Who goes there?");
                offLoop |= !_loop.OnLoop;
                log.Add("resumed");
                return text;
            });
            Assert.IsFalse(offLoop, "events and the continuation run on the main thread");
            Assert.Greater(chunks.Count, 0);
            CollectionAssert.AreEqual(Enumerable.Repeat("updated", chunks.Count).Concat(new[] { "finished", "resumed" }), log,
                "every chunk, then the end, then the awaiting code");
            Assert.AreEqual(reply, string.Concat(chunks));
            IList<ChatMessage> history = npc.History;
            Assert.AreEqual(2, history.Count);
            Assert.AreEqual(reply, history[1].Content);
        }

        [Test]
        public void NpcRequestFailedCarriesTheCodeAndAMessageWithoutIt()
        {
            LoraloomNpc npc = Npc(Daemon(Env("LORALOOM_TEST_URL"), Env("LORALOOM_TEST_TOKEN")), "ghost", 8);
            var failures = new List<string[]>();
            npc.RequestFailed.AddListener((code, message) => failures.Add(new[] { code, message }));
            LoraloomException error = _loop.Await(async () =>
            {
                try
                {
                    await npc.AskAsync("Boo");
                    return null;
                }
                catch (LoraloomException e)
                {
                    return e;
                }
            });
            Assert.IsNotNull(error, "AskAsync faults");
            Assert.AreEqual(1, failures.Count);
            Assert.AreEqual(ErrorCodes.UnknownAdapter, failures[0][0]);
            StringAssert.Contains("ghost", failures[0][1]);
            StringAssert.DoesNotStartWith(ErrorCodes.UnknownAdapter, failures[0][1], "no doubled code");
            Assert.AreEqual(0, npc.History.Count);
        }

        [Test]
        public void NpcConversationSavesAndLoads()
        {
            var npc = new LoraloomNpc { systemPrompt = "You are Meg." };
            npc.History = new List<ChatMessage> { new ChatMessage(ChatRole.User, "hi"), new ChatMessage(ChatRole.Assistant, "arr") };
            string saved = npc.SaveConversation();
            var other = new LoraloomNpc { systemPrompt = "someone else" };
            other.LoadConversation(saved);
            Assert.AreEqual("You are Meg.", other.systemPrompt, "the persona comes with the save");
            CollectionAssert.AreEqual(new[] { "hi", "arr" }, other.History.Select(m => m.Content));
            Assert.Throws<FormatException>(() => other.LoadConversation("{\"history\": 3}"));
            CollectionAssert.AreEqual(new[] { "hi", "arr" }, other.History.Select(m => m.Content), "a bad save changes nothing");
            other.ClearHistory();
            Assert.AreEqual(0, other.History.Count);
        }

        public enum LayerAction { attack, flee, talk }

        public sealed class LayerQuest
        {
            [JsonField(MaxLength = 16)] public string title;
            [JsonField(Minimum = 5, Maximum = 250)] public int reward;
            public LayerAction action;
        }

        public sealed class GiveArgs
        {
            [JsonField(MaxLength = 12)] public string item;
            [JsonField(Minimum = 1, Maximum = 5)] public int count;
        }

        /// <summary>Records an NPC's events in order, and whether any ran off the main thread.</summary>
        sealed class NpcLog
        {
            public readonly List<string> Order = new List<string>();
            public readonly List<object> Json = new List<object>();
            public readonly List<string> Calls = new List<string>();
            public readonly List<string> Failures = new List<string>();
            public bool OffLoop;

            public NpcLog(LoraloomNpc npc, FrameLoop loop)
            {
                npc.ResponseUpdated.AddListener(chunk => Add(loop, "updated"));
                npc.ResponseFinished.AddListener(text => Add(loop, "finished"));
                npc.RequestFailed.AddListener((code, message) => { Failures.Add(code); Add(loop, "failed"); });
                npc.JsonReceived.AddListener(json => { Json.Add(json); Add(loop, "json"); });
                npc.ToolCalled.AddListener((name, arguments) => { Calls.Add(name); Add(loop, "tool"); });
            }

            public void Add(FrameLoop loop, string what)
            {
                OffLoop |= !loop.OnLoop;
                Order.Add(what);
            }

            /// <summary>The order with the run of chunks folded into one "updated".</summary>
            public List<string> Folded()
            {
                var folded = new List<string>();
                foreach (string e in Order)
                    if (e != "updated" || folded.Count == 0 || folded[folded.Count - 1] != "updated") folded.Add(e);
                Order.Clear();
                return folded;
            }
        }

        [Test]
        public void NpcStructuredAsksFireTheirEventsBeforeTheAwaitResumes()
        {
            LoraloomNpc npc = Npc(Daemon(Env("LORALOOM_TEST_URL"), Env("LORALOOM_TEST_TOKEN")), "beta", 200);
            npc.seed = 11;
            var log = new NpcLog(npc, _loop);
            LayerQuest quest = _loop.Await(async () =>
            {
                LayerQuest value = await npc.AskJsonAsync<LayerQuest>("A quest, please.");
                log.Add(_loop, "resumed");
                return value;
            });
            CollectionAssert.AreEqual(new[] { "updated", "json", "finished", "resumed" }, log.Folded());
            Assert.LessOrEqual(quest.title.Count(c => !char.IsLowSurrogate(c)), 16, "code points: " + quest.title);
            Assert.That(quest.reward, Is.InRange(5, 250));
            var tree = (Dictionary<string, object>)log.Json.Single();
            Assert.AreEqual((long)quest.reward, tree["reward"]);
            Assert.AreEqual(quest.action.ToString(), tree["action"]);

            // Short replies from here on, so that the daemon's 256-token context holds the whole
            // history (it would trim the oldest turns, and the NPC forget them, otherwise).
            npc.maxTokens = 16;
            LayerAction action = _loop.Await(() => npc.AskChoiceAsync<LayerAction>("The goblin attacks!"));
            Assert.IsTrue(Enum.IsDefined(typeof(LayerAction), action));
            string time = _loop.Await(() => npc.AskRegexAsync("What time is it?", "[0-9]{2}:[0-9]{2}"));
            StringAssert.IsMatch("^[0-9]{2}:[0-9]{2}$", time);
            CollectionAssert.AreEqual(new[] { "updated", "finished", "updated", "finished" }, log.Folded(), "no json without a schema");
            Assert.AreEqual(6, npc.History.Count, "constrained lines are recorded like any other");
            Assert.AreEqual(action.ToString(), npc.History[3].Content);

            // Cut short: the line fails with the code "incomplete" and is not recorded.
            npc.maxTokens = 3;
            LoraloomException cut = _loop.Await(async () =>
            {
                try
                {
                    await npc.AskJsonAsync("Another quest.", JsonSchema.For<LayerQuest>());
                    return null;
                }
                catch (LoraloomException e)
                {
                    return e;
                }
            });
            Assert.IsNotNull(cut, "AskJsonAsync faults");
            Assert.AreEqual(ResultConstraint.Incomplete, cut.Code);
            CollectionAssert.AreEqual(new[] { ResultConstraint.Incomplete }, log.Failures);
            CollectionAssert.AreEqual(new[] { "updated", "failed" }, log.Folded());
            Assert.AreEqual(6, npc.History.Count);
            Assert.IsFalse(log.OffLoop, "events run on the main thread");
        }

        [Test]
        public void AThrowingListenerDoesNotStrandTheAwaitingCode()
        {
            LoraloomNpc npc = Npc(Daemon(Env("LORALOOM_TEST_URL"), Env("LORALOOM_TEST_TOKEN")), "gamma", 8);
            npc.ResponseFinished.AddListener(text => { throw new InvalidOperationException("a game script's bug"); });
            npc.RequestFailed.AddListener((failure, message) => { throw new InvalidOperationException("another one"); });
            string choice = _loop.Await(() => npc.AskChoiceAsync("Yes or no?", new[] { "yes", "no" }), TimeSpan.FromSeconds(60));
            CollectionAssert.Contains(new[] { "yes", "no" }, choice);
            string code = _loop.Await(async () =>
            {
                try { await npc.AskRegexAsync("Hi", "[a-"); return null; }
                catch (LoraloomException e) { return e.Code; }
            }, TimeSpan.FromSeconds(60));
            Assert.AreEqual(ErrorCodes.InvalidParameter, code, "the fault still reaches the awaiting code");
        }

        [Test]
        public void NpcToolCallsFireToolCalledAndComeBack()
        {
            LoraloomNpc npc = Npc(Daemon(Env("LORALOOM_TEST_TOOLS_URL"), Env("LORALOOM_TEST_TOKEN")), "alpha", 80);
            npc.seed = 3;
            npc.temperature = 1f;
            // Tool definitions are long in the tiny model's 384-token vocabulary, and the daemon's
            // trim_history does not count them: lines go out without the history.
            npc.keepHistory = false;
            var door = new Tool("open_door", "Open a door", new Dictionary<string, object>
            {
                { "type", "object" },
                { "required", new List<object> { "door" } },
                { "properties", new Dictionary<string, object> { { "door", new Dictionary<string, object> { { "enum", new List<object> { "gate", "tower" } } } } } },
            });
            npc.Tools = new List<Tool> { door, Tool.For<GiveArgs>("give_item", "Give an item") };
            npc.toolChoice = ToolChoice.Required;
            var log = new NpcLog(npc, _loop);
            IList<ToolCall> calls = _loop.Await(() => npc.AskToolCallsAsync("Open the tower and give me a sword."));
            Assert.AreEqual(1, calls.Count);
            CollectionAssert.Contains(new[] { "open_door", "give_item" }, calls[0].Name);
            CollectionAssert.AreEqual(new[] { calls[0].Name }, log.Calls);
            CollectionAssert.AreEqual(new[] { "updated", "tool", "finished" }, log.Folded());

            npc.toolChoice = "give_item";
            string text = _loop.Await(() => npc.AskAsync("A sword, please."));
            CollectionAssert.AreEqual(new[] { calls[0].Name, "give_item" }, log.Calls);
            StringAssert.Contains("give_item", text, "the reply's text is the call");
            CollectionAssert.AreEqual(new[] { "updated", "tool", "finished" }, log.Folded());

            // A schema line of an NPC with tools goes out without them (one constraint per line).
            npc.maxTokens = 200;
            LayerQuest quest = _loop.Await(() => npc.AskJsonAsync<LayerQuest>("And a quest."));
            Assert.That(quest.reward, Is.InRange(5, 250));
            Assert.AreEqual(2, log.Calls.Count);
            Assert.IsFalse(log.OffLoop);
        }

        /// <summary>The daemon's /healthz gpu_budget.</summary>
        static Dictionary<string, object> GpuBudget(string wsUrl)
        {
            var uri = new Uri(wsUrl);
            using (var web = new System.Net.WebClient())
            {
                var health = (Dictionary<string, object>)MiniJson(web.DownloadString("http://" + uri.Host + ":" + uri.Port + "/healthz"));
                return (Dictionary<string, object>)health["gpu_budget"];
            }
        }

        // Loraloom.Core's JSON reader is internal to it; its tests' assembly is the one it trusts.
        static object MiniJson(string text)
        {
            return typeof(LoraloomClient).Assembly.GetType("Loraloom.Core.Json")
                .GetMethod("Parse", BindingFlags.Public | BindingFlags.Static).Invoke(null, new object[] { text });
        }

        /// <summary>One frame of the player loop: every system's update, depth first, as Unity runs them.</summary>
        static void RunPlayerLoop(UnityEngine.LowLevel.PlayerLoopSystem system)
        {
            if (system.updateDelegate != null) system.updateDelegate();
            if (system.subSystemList == null) return;
            foreach (UnityEngine.LowLevel.PlayerLoopSystem child in system.subSystemList) RunPlayerLoop(child);
        }

        static int BudgetSystems(UnityEngine.LowLevel.PlayerLoopSystem system)
        {
            int count = system.type == typeof(LoraloomGpuBudget) ? 1 : 0;
            if (system.subSystemList != null)
                foreach (UnityEngine.LowLevel.PlayerLoopSystem child in system.subSystemList) count += BudgetSystems(child);
            return count;
        }

        [Test]
        public void GpuBudgetGoesOutOnConnectAndThePlayerLoopReportsFrames()
        {
            SetBudget none = new LoraloomGpuBudget().ToMessage();
            Assert.IsTrue(none.DutyCap == null && none.TokensPerS == null && none.FrameSync == null && none.MaxStepMs == null,
                "off by default");
            string url = Env("LORALOOM_TEST_URL");
            LoraloomDaemon daemon = Daemon(url, Env("LORALOOM_TEST_TOKEN"));
            var budget = new LoraloomGpuBudget
            {
                enabled = true, dutyCap = 0.5f, backgroundTokensPerSecond = 30f,
                frameSync = true, framePeriodMs = 8.3f, gameGpuMs = 3.5f,
            };
            budget.Daemon = daemon;
            var applied = new List<Budget>();
            bool offLoop = false;
            budget.BudgetApplied.AddListener(b => { offLoop |= !_loop.OnLoop; applied.Add(b); });
            _loop.Run(() => Call(budget, "OnEnable"));
            Assert.IsTrue(WaitOnLoop(() => budget.InForce != null && applied.Count == 1), "the budget was applied once connected");
            Assert.IsTrue(budget.InForce.SetByClient);
            Dictionary<string, object> health = GpuBudget(url);
            Assert.AreEqual(true, health["set_by_client"]);
            Assert.AreEqual(0.5, Convert.ToDouble(health["duty_cap"]));
            Assert.AreEqual(30.0, Convert.ToDouble(((Dictionary<string, object>)health["tokens_per_s"])["background"]));
            var sync = (Dictionary<string, object>)health["frame_sync"];
            Assert.AreEqual(8.3, Convert.ToDouble(sync["period_ms"]), 1e-4);
            Assert.AreEqual(3.5, Convert.ToDouble(sync["game_ms"]), 1e-4);
            Assert.AreEqual(1, BudgetSystems(UnityEngine.LowLevel.PlayerLoop.GetCurrentPlayerLoop()), "one system in the player loop");

            LoraloomClient client = daemon.Client;
            long frames = Convert.ToInt64(health["frames"]);
            long sent = client.FramesSent, skipped = client.FramesSkipped;
            for (int i = 0; i < 40; i++)
            {
                _loop.Run(() => RunPlayerLoop(UnityEngine.LowLevel.PlayerLoop.GetCurrentPlayerLoop()));
                Thread.Sleep(4);
            }
            Assert.IsTrue(WaitOnLoop(() => client.FramesSent - sent + client.FramesSkipped - skipped == 40), "every frame reported or skipped");
            long reported = client.FramesSent - sent;
            Assert.GreaterOrEqual(reported, 30, "a frame is skipped only while the last one is still being sent");
            Assert.IsTrue(WaitOnLoop(() => Convert.ToInt64(GpuBudget(url)["frames"]) - frames == reported),
                "the daemon counted every frame sent: " + (Convert.ToInt64(GpuBudget(url)["frames"]) - frames) + " of " + reported);

            // Without frame sync the loop reports nothing.
            budget.frameSync = false;
            long now = client.FramesSent;
            for (int i = 0; i < 5; i++) _loop.Run(() => RunPlayerLoop(UnityEngine.LowLevel.PlayerLoop.GetCurrentPlayerLoop()));
            Assert.AreEqual(now, client.FramesSent);

            // Disabling lifts the budget and takes the system out of the loop.
            _loop.Run(() => Call(budget, "OnDisable"));
            Assert.AreEqual(0, BudgetSystems(UnityEngine.LowLevel.PlayerLoop.GetCurrentPlayerLoop()));
            Assert.IsTrue(WaitOnLoop(() => false.Equals(GpuBudget(url)["active"])), "lifted on the daemon");
            Assert.IsFalse(offLoop, "BudgetApplied fires on the main thread");
        }

        /// <summary>Runs <paramref name="frames"/> frames of the player loop, a few ms apart.</summary>
        void RunFrames(int frames)
        {
            for (int i = 0; i < frames; i++)
            {
                _loop.Run(() => RunPlayerLoop(UnityEngine.LowLevel.PlayerLoop.GetCurrentPlayerLoop()));
                Thread.Sleep(4);
            }
        }

        /// <summary>Runs <paramref name="frames"/> frames; at least 4 are sent and the daemon counted every one sent.</summary>
        void FramesCounted(LoraloomClient client, string url, int frames)
        {
            long counted = Convert.ToInt64(GpuBudget(url)["frames"]);
            long sent = client.FramesSent, skipped = client.FramesSkipped;
            RunFrames(frames);
            Assert.IsTrue(WaitOnLoop(() => client.FramesSent - sent + client.FramesSkipped - skipped == frames), "every frame reported or skipped");
            Assert.GreaterOrEqual(client.FramesSent - sent, 4, "enough frames for the daemon to use their times");
            Assert.IsTrue(WaitOnLoop(() => Convert.ToInt64(GpuBudget(url)["frames"]) - counted == client.FramesSent - sent),
                "the daemon counted every frame sent (none refused)");
        }

        static double? GameMsInUse(string url)
        {
            object value = GpuBudget(url)["game_ms_in_use"];
            return value == null ? (double?)null : Convert.ToDouble(value);
        }

        [Test]
        public void GpuBudgetReportsTheGpuTimeUnityMeasuredForTheLastFrame()
        {
            Assert.IsTrue(new LoraloomGpuBudget().reportMeasuredGpuTime, "on by default");
            string url = Env("LORALOOM_TEST_URL");
            LoraloomDaemon daemon = Daemon(url, Env("LORALOOM_TEST_TOKEN"));
            var budget = new LoraloomGpuBudget { enabled = true, frameSync = true, framePeriodMs = 8.3f, gameGpuMs = 3.5f };
            budget.Daemon = daemon;
            UnityEngine.FrameTimingManager.measured = null;
            try
            {
                _loop.Run(() => Call(budget, "OnEnable"));
                Assert.IsTrue(WaitOnLoop(() => budget.InForce != null), "the budget was applied once connected");
                LoraloomClient client = daemon.Client;

                // Nothing measured (Frame Timing Stats off): frames without a time, the static part in use.
                FramesCounted(client, url, 20);
                Assert.AreEqual(3.5, GameMsInUse(url).Value, 1e-9, "no measurement: gameGpuMs");

                // Unity measured 2.25 ms of GPU time a frame: the daemon takes the game's part from it.
                UnityEngine.FrameTimingManager.measured = new UnityEngine.FrameTiming { cpuFrameTime = 6.0, gpuFrameTime = 2.25 };
                FramesCounted(client, url, 20);
                Assert.AreEqual(2.25, GameMsInUse(url).Value, 1e-9, "the measured part in use");

                // A GPU time of 0 (not measured on this platform) is not sent (a new budget starts over).
                UnityEngine.FrameTimingManager.measured = new UnityEngine.FrameTiming { cpuFrameTime = 6.0, gpuFrameTime = 0.0 };
                Assert.AreEqual(3.5, _loop.Await(() => budget.Apply()).FrameSync.GameMs);
                Assert.AreEqual(3.5, GameMsInUse(url).Value, 1e-9, "a new budget forgets the reports");
                FramesCounted(client, url, 20);
                Assert.AreEqual(3.5, GameMsInUse(url).Value, 1e-9, "0 ms (not measured) is not sent");

                // With the toggle off, nothing measured is sent.
                UnityEngine.FrameTimingManager.measured = new UnityEngine.FrameTiming { gpuFrameTime = 2.25 };
                budget.reportMeasuredGpuTime = false;
                FramesCounted(client, url, 20);
                Assert.AreEqual(3.5, GameMsInUse(url).Value, 1e-9, "reportMeasuredGpuTime off: the static part");
            }
            finally
            {
                UnityEngine.FrameTimingManager.measured = null;
                _loop.Run(() => Call(budget, "OnDisable"));
            }
            Assert.IsTrue(WaitOnLoop(() => false.Equals(GpuBudget(url)["active"])), "lifted on the daemon");
        }

        /// <summary>
        /// A stand-in for the `loraloom bundle` runtime folder: an executable `loraloom` script that
        /// records how it was launched and then execs the real `loraloom` console script of the test
        /// venv (so the daemon that answers is the real one, started from where a build puts it).
        /// </summary>
        static string StandInRuntime()
        {
            string folder = Path.Combine(TempDir(), "bundle");
            Directory.CreateDirectory(folder);
            string script = Path.Combine(folder, "loraloom");
            File.WriteAllText(script, "#!/bin/sh\n"
                + "printf '%s\\n' \"$0\" \"$@\" > \"$(dirname \"$0\")/launched.txt\"\n"
                + "exec '" + Env("LORALOOM_TEST_LORALOOM") + "' \"$@\"\n");
            File.WriteAllText(Path.Combine(folder, "_internal.txt"), "the bundle's other files");
            using (Process chmod = Process.Start("chmod", "755 " + script)) chmod.WaitForExit();
            return folder;
        }

        [Test]
        public void APlayerBuildCarriesTheRuntimeAndPackAndLaunchesThemFromThere()
        {
            // Where each desktop build keeps StreamingAssets.
            string build = TempDir();
            string streaming = Loraloom.Editor.LoraloomBuildStep.StreamingAssetsOf(UnityEditor.BuildTarget.StandaloneLinux64, Path.Combine(build, "Game.x86_64"));
            Assert.AreEqual(Path.Combine(build, "Game_Data", "StreamingAssets"), streaming);
            Assert.AreEqual(Path.Combine(build, "Game_Data", "StreamingAssets"),
                Loraloom.Editor.LoraloomBuildStep.StreamingAssetsOf(UnityEditor.BuildTarget.StandaloneWindows64, Path.Combine(build, "Game.exe")));
            Assert.AreEqual(Path.Combine(build, "Game.app", "Contents", "Resources", "Data", "StreamingAssets"),
                Loraloom.Editor.LoraloomBuildStep.StreamingAssetsOf(UnityEditor.BuildTarget.StandaloneOSX, Path.Combine(build, "Game.app")));
            Assert.IsNull(Loraloom.Editor.LoraloomBuildStep.StreamingAssetsOf(UnityEditor.BuildTarget.Android, Path.Combine(build, "Game.apk")));

            // The build step: refuses what is not a runtime or a pack, replaces what an older build left.
            string runtime = StandInRuntime();
            string pack = Env("LORALOOM_TEST_PACK");
            Assert.Throws<UnityEditor.Build.BuildFailedException>(() => Loraloom.Editor.LoraloomBuildStep.CopyInto(
                streaming, UnityEditor.BuildTarget.StandaloneWindows64, runtime, null), "a Windows build needs loraloom.exe");
            Assert.Throws<UnityEditor.Build.BuildFailedException>(() => Loraloom.Editor.LoraloomBuildStep.CopyInto(
                streaming, UnityEditor.BuildTarget.StandaloneLinux64, null, runtime), "no manifest.json: not a pack");
            string stale = Path.Combine(streaming, "Loraloom", "runtime", "stale.txt");
            Directory.CreateDirectory(Path.GetDirectoryName(stale));
            File.WriteAllText(stale, "from the last build");
            string root = Loraloom.Editor.LoraloomBuildStep.CopyInto(streaming, UnityEditor.BuildTarget.StandaloneLinux64, runtime, pack);
            Assert.AreEqual(Path.Combine(streaming, "Loraloom"), root);
            Assert.IsTrue(File.Exists(Path.Combine(root, "runtime", "loraloom")));
            Assert.IsTrue(File.Exists(Path.Combine(root, "runtime", "_internal.txt")));
            Assert.IsFalse(File.Exists(stale), "the last build's runtime was replaced");
            Assert.IsTrue(File.Exists(Path.Combine(root, "pack", "manifest.json")));
            Assert.AreEqual(Directory.GetFiles(pack, "*", SearchOption.AllDirectories).Length,
                Directory.GetFiles(Path.Combine(root, "pack"), "*", SearchOption.AllDirectories).Length, "the whole pack");

            bool wasEditor = UnityEngine.Application.isEditor;
            string wasStreaming = UnityEngine.Application.streamingAssetsPath;
            try
            {
                // In the editor: the developer's loraloom, whatever the build carries.
                UnityEngine.Application.isEditor = true;
                UnityEngine.Application.streamingAssetsPath = streaming;
                LoraloomDaemon editor = Daemon();
                var fromCommand = (DaemonLauncherOptions)Invoke(editor, "LaunchOptions");
                Assert.AreEqual("loraloom", fromCommand.Executable);

                // In the player: the build's runtime, with its pack.
                UnityEngine.Application.isEditor = false;
                string runtimeFile = Path.Combine(TempDir(), "daemon.json");
                LoraloomDaemon daemon = Daemon(runtimeFile: runtimeFile, connectWait: 60f);
                Set(daemon, "launchIfNotRunning", true);
                Set(daemon, "startTimeoutSeconds", 120f);
                LoraloomNpc npc = Npc(daemon, "alpha", 8);
                string reply = _loop.Await(() => npc.AskAsync("Who are you?"), TimeSpan.FromSeconds(150));
                Assert.IsNotNull(reply);
                Assert.IsTrue(daemon.LaunchedDaemon, "the component started it");
                string[] launched = File.ReadAllLines(Path.Combine(root, "runtime", "launched.txt"));
                Assert.AreEqual(Path.Combine(root, "runtime", "loraloom"), launched[0], "the build's runtime ran");
                CollectionAssert.IsSubsetOf(new[] { "serve", "--port", "0", "--pack", Path.Combine(root, "pack") }, launched.Skip(1).ToList());
                CollectionAssert.IsSubsetOf(new[] { "alpha", "beta", "gamma" }, daemon.Client.Welcome.Adapters.Select(a => a.Name).ToList(),
                    "the pack's adapters");
                RuntimeInfo info;
                Assert.IsTrue(RuntimeFile.TryRead(runtimeFile, out info));

                // Quitting the player stops it, and waits for that.
                _loop.Run(() => Call(daemon, "OnApplicationQuit"));
                Assert.IsFalse(IsAlive(info.Pid), "stopped before the player exits");
                Assert.IsFalse(File.Exists(runtimeFile));

                // A player that carries no runtime, with no loraloom to fall back on, says so.
                UnityEngine.Application.streamingAssetsPath = TempDir();
                LoraloomDaemon bare = Daemon(runtimeFile: Path.Combine(TempDir(), "daemon.json"));
                Set(bare, "launchIfNotRunning", true);
                Set(bare, "command", "loraloom-not-installed serve --port 0");
                string why = _loop.Await(async () =>
                {
                    try { await bare.Ready; return "connected"; }
                    catch (LoraloomException e) { return e.Code + ": " + e.Message; }
                });
                StringAssert.StartsWith(ErrorCodes.DaemonNotFound, why);
                StringAssert.Contains("carries no runtime at " + Path.Combine(UnityEngine.Application.streamingAssetsPath, "Loraloom", "runtime", "loraloom"), why);
            }
            finally
            {
                UnityEngine.Application.isEditor = wasEditor;
                UnityEngine.Application.streamingAssetsPath = wasStreaming;
            }
        }

        static object Invoke(object target, string method)
        {
            return target.GetType().GetMethod(method, BindingFlags.NonPublic | BindingFlags.Instance).Invoke(target, null);
        }

        [Test]
        public void DaemonRecoversFromAFailedStartAndRaisesItsConnectionEvents()
        {
            string runtimeFile = Path.Combine(TempDir(), "daemon.json");
            LoraloomDaemon daemon = Daemon(runtimeFile: runtimeFile, connectWait: 1f);
            var events = new List<string>();
            daemon.Connected.AddListener(() => events.Add("connected"));
            daemon.Reconnected.AddListener(() => events.Add("reconnected"));
            daemon.Disconnected.AddListener(why => events.Add("disconnected"));
            daemon.ConnectionFailed.AddListener(why => events.Add("failed"));
            LoraloomNpc npc = Npc(daemon, "alpha", 6);
            var failures = new List<string>();
            npc.RequestFailed.AddListener((code, message) => failures.Add(code));

            // No daemon yet: the line fails once the connection wait is over.
            string early = _loop.Await(async () =>
            {
                try { return await npc.AskAsync("anyone?"); }
                catch (LoraloomException e) { return "failed " + e.Code; }
            });
            Assert.AreEqual("failed " + ErrorCodes.NotConnected, early);
            CollectionAssert.AreEqual(new[] { ErrorCodes.NotConnected }, failures);
            Assert.IsTrue(_loop.Await(() => Task.FromResult(events.Contains("failed"))), "failed attempts are reported");

            var first = new DaemonLauncher(new DaemonLauncherOptions { Executable = ServeCommand(runtimeFile)[0],
                Arguments = ServeCommand(runtimeFile).Skip(1).ToList(), RuntimeFile = runtimeFile, StartTimeout = TimeSpan.FromSeconds(90) });
            try
            {
                Wait(first.EnsureRunningAsync(), 120);
                // The faulted Ready is not kept: this line is answered.
                string reply = _loop.Await(() => AskUntilConnected(daemon, npc, "and now?"), TimeSpan.FromSeconds(90));
                Assert.IsNotNull(reply);
                first.Stop();
                Assert.IsTrue(WaitOnLoop(() => events.Contains("disconnected")), string.Join(",", events));
                using (var second = new DaemonLauncher(new DaemonLauncherOptions { Executable = ServeCommand(runtimeFile)[0],
                    Arguments = ServeCommand(runtimeFile).Skip(1).ToList(), RuntimeFile = runtimeFile, StartTimeout = TimeSpan.FromSeconds(90) }))
                {
                    Wait(second.EnsureRunningAsync(), 120);
                    Assert.IsTrue(WaitOnLoop(() => events.Contains("reconnected")), string.Join(",", events));
                    string again = _loop.Await(() => npc.AskAsync("still there?"), TimeSpan.FromSeconds(60));
                    Assert.IsNotNull(again);
                    List<string> connection = _loop.Await(() => Task.FromResult(events.Where(e => e != "failed").ToList()));
                    CollectionAssert.AreEqual(new[] { "connected", "disconnected", "connected", "reconnected" }, connection);
                    _loop.Run(() => Call(daemon, "OnDestroy"));
                }
            }
            finally
            {
                first.Dispose();
            }
            Assert.AreEqual(4, npc.History.Count, "the two answered lines");
        }

        // The first line after the daemon came up may still meet the end of the previous wait.
        static async Task<string> AskUntilConnected(LoraloomDaemon daemon, LoraloomNpc npc, string text)
        {
            for (int attempt = 0; ; attempt++)
            {
                try
                {
                    await daemon.Ready;
                    return await npc.AskAsync(text);
                }
                catch (LoraloomException e)
                {
                    if (e.Code != ErrorCodes.NotConnected || attempt >= 60) throw;
                }
            }
        }

        bool WaitOnLoop(Func<bool> condition)
        {
            var clock = Stopwatch.StartNew();
            while (clock.Elapsed < TimeSpan.FromSeconds(60))
            {
                if (_loop.Await(() => Task.FromResult(condition()))) return true;
                Thread.Sleep(20);
            }
            return false;
        }

        static void Wait(Task task, int seconds)
        {
            if (!task.Wait(TimeSpan.FromSeconds(seconds))) Assert.Fail("no end within " + seconds + " s");
        }

        [Test]
        public void ALaunchedDaemonIsStoppedWithoutBlockingTheMainThread()
        {
            // A stand-in daemon that publishes itself and ignores SIGTERM, so that only the kill
            // after the grace period ends it: OnDestroy must return long before that.
            string dir = TempDir();
            string runtimeFile = Path.Combine(dir, "daemon.json");
            string termed = Path.Combine(dir, "termed");
            string script = "import json, os, signal, socket, sys, time\n"
                + "signal.signal(signal.SIGTERM, lambda *a: open(sys.argv[2], 'w').close())\n"
                + "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(5); port = s.getsockname()[1]\n"
                + "json.dump({'url': 'ws://127.0.0.1:%d' % port, 'host': '127.0.0.1', 'port': port, 'token': 't', 'pid': os.getpid(), "
                + "'version': '0', 'protocol': 1}, open(sys.argv[1], 'w'))\n"
                + "while True: time.sleep(0.05)\n";
            string python = ServeCommand(runtimeFile)[0];
            LoraloomDaemon daemon = Daemon(runtimeFile: runtimeFile, connectWait: 1f);
            Set(daemon, "launchIfNotRunning", true);
            Set(daemon, "command", DaemonLauncher.JoinArguments(new[] { python, "-c", script, runtimeFile, termed }));
            Set(daemon, "stopGraceSeconds", 3f);
            _loop.Run(() => Call(daemon, "Start"));
            RuntimeInfo info = null;
            Assert.IsTrue(WaitOnLoop(() => daemon.LaunchedDaemon && RuntimeFile.TryRead(runtimeFile, out info)),
                "the component started the daemon, which published itself");
            int pid = info.Pid;

            bool aliveWhenReturned = _loop.Await(() =>
            {
                Call(daemon, "OnDestroy");
                return Task.FromResult(IsAlive(pid));
            });
            _daemons.Remove(daemon);
            Assert.IsTrue(aliveWhenReturned, "OnDestroy returned while the daemon was still within its grace period");
            var clock = Stopwatch.StartNew();
            while ((IsAlive(pid) || File.Exists(runtimeFile)) && clock.Elapsed < TimeSpan.FromSeconds(30)) Thread.Sleep(50);
            Assert.IsTrue(File.Exists(termed), "SIGTERM came first");
            Assert.IsFalse(IsAlive(pid), "killed after the grace period");
            Assert.IsFalse(File.Exists(runtimeFile), "its runtime file was removed for it");
        }

        static bool IsAlive(int pid)
        {
            try
            {
                using (Process process = Process.GetProcessById(pid)) return !process.HasExited;
            }
            catch (ArgumentException)
            {
                return false;
            }
        }
    }
}
