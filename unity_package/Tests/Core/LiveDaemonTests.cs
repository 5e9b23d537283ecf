using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Threading;
using System.Threading.Tasks;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>
    /// The client against the real daemon that tests/unity/test_unity.py started (a tiny random
    /// model: its text is gibberish, so these tests check structure, never content).
    /// </summary>
    [TestFixture]
    public class LiveDaemonTests
    {
        LoraloomClient _client;

        [SetUp]
        public void Connect()
        {
            _client = TestEnv.Await(LoraloomClient.ConnectAsync(new LoraloomClientOptions
            {
                Url = TestEnv.Url,
                Token = TestEnv.Token,
                ClientName = "nunit",
            }));
        }

        [TearDown]
        public void Close()
        {
            if (_client != null) TestEnv.Run(() => _client.CloseAsync(), TimeSpan.FromSeconds(10));
        }

        static Generate Chat(string adapter, string text, int maxTokens)
        {
            var request = new Generate
            {
                Messages = new List<ChatMessage> { new ChatMessage(ChatRole.User, text) },
                MaxTokens = maxTokens,
                Temperature = 0.8,
                Seed = 1234,
            };
            if (adapter != null) request.Adapters.Add(new AdapterRef(adapter));
            return request;
        }

        [Test]
        public void HandshakeAnnouncesTheModelAndTheTestAdapters()
        {
            Welcome welcome = _client.Welcome;
            Assert.AreEqual(Protocol.Version, welcome.Protocol);
            Assert.IsNotNull(welcome.TextModel, "the test daemon serves a text model");
            Assert.AreEqual(AdapterKind.Text, welcome.TextModel.Kind);
            Assert.Greater(welcome.Limits.MaxFrameBytes, 0);
            var names = _client.Adapters.Select(a => a.Name).ToList();
            CollectionAssert.IsSubsetOf(new[] { "alpha", "beta", "gamma" }, names);
            Assert.AreEqual(ConnectionState.Connected, _client.State);
            Assert.Greater(TestEnv.Await(_client.PingAsync()), TimeSpan.Zero);
        }

        [Test]
        public void ListAdaptersReportsReadyTextAdapters()
        {
            var adapters = TestEnv.Await(_client.ListAdaptersAsync());
            foreach (string name in new[] { "alpha", "beta", "gamma" })
            {
                AdapterInfo info = adapters.FirstOrDefault(a => a.Name == name);
                Assert.IsNotNull(info, name + " is listed");
                Assert.AreEqual(AdapterKind.Text, info.Kind);
                Assert.AreEqual(AdapterStatus.Ready, info.Status);
                Assert.GreaterOrEqual(info.Version ?? 0, 1);
                Assert.IsNotEmpty(info.Targets);
            }
        }

        [Test]
        public void StreamsOnTwoAdaptersAtOnce()
        {
            var pieces = new Dictionary<string, List<string>> { { "alpha", new List<string>() }, { "beta", new List<string>() } };
            var tasks = new Dictionary<string, Task<Completion>>();
            foreach (string adapter in pieces.Keys.ToList())
            {
                List<string> mine = pieces[adapter];
                // Both requests are in flight on one connection before either finishes.
                tasks[adapter] = _client.GenerateAsync(Chat(adapter, "Who goes there?", 24), piece => { lock (mine) mine.Add(piece); });
            }
            Assert.IsTrue(Task.WaitAll(tasks.Values.ToArray(), TestEnv.Patience), "both generations finish");
            foreach (var pair in tasks)
            {
                Completion done = pair.Value.Result;
                List<string> streamed = pieces[pair.Key];
                Assert.That(done.FinishReason, Is.EqualTo(FinishReason.Stop).Or.EqualTo(FinishReason.Length), pair.Key);
                Assert.Greater(done.CompletionTokens, 0, pair.Key + " generated tokens");
                Assert.Greater(streamed.Count, 0, pair.Key + " streamed chunks");
                Assert.AreEqual(streamed.Count, done.Chunks, pair.Key + ": every chunk reached the callback");
                Assert.AreEqual(done.Text, string.Concat(streamed), pair.Key + ": the chunks add up to the text");
                Assert.LessOrEqual(done.CompletionTokens, 24);
                CollectionAssert.AreEquivalent(new[] { pair.Key }, done.AdapterVersions.Keys, pair.Key + " served by its own adapter only");
                Assert.GreaterOrEqual(done.AdapterVersions[pair.Key], 1);
                Assert.IsNotNull(done.Timings);
            }
        }

        [Test]
        public void WithoutStreamingOnlyTheResultArrives()
        {
            int calls = 0;
            var request = Chat("gamma", "Hello", 8);
            request.Stream = false;
            Completion done = TestEnv.Await(_client.GenerateAsync(request, piece => Interlocked.Increment(ref calls)));
            Assert.AreEqual(0, calls);
            Assert.AreEqual(0, done.Chunks);
            Assert.Greater(done.CompletionTokens, 0);
        }

        [Test]
        public void CancellingMidStreamCancelsTheTaskAndTheRequest()
        {
            var results = new ConcurrentQueue<Result>();
            _client.MessageReceived += m => { var r = m as Result; if (r != null) results.Enqueue(r); };
            int context = _client.Welcome.TextModel.ContextLength ?? 256;
            int maxTokens = Math.Max(8, Math.Min(_client.Welcome.Limits.MaxNewTokens, context - 32));
            var cts = new CancellationTokenSource();
            int seen = 0;
            int seenWhenCancelled = -1;
            var request = Chat("beta", "Tell me a long story.", maxTokens);
            request.Id = "cancel-me-" + Guid.NewGuid().ToString("N").Substring(0, 8);
            request.Stop.Clear();
            Task<Completion> task = _client.GenerateAsync(request, piece =>
            {
                if (Interlocked.Increment(ref seen) == 1)
                {
                    seenWhenCancelled = 1;
                    cts.Cancel();
                }
            }, cts.Token);
            try
            {
                task.Wait(TestEnv.Patience);
                Assert.Fail("the task finished instead of being cancelled: " + task.Result);
            }
            catch (AggregateException e)
            {
                Assert.IsInstanceOf<OperationCanceledException>(e.InnerException);
            }
            Assert.IsTrue(task.IsCanceled, "the task ends cancelled");
            // The daemon answers the cancel with the request's result, finish_reason "cancelled".
            Result final = null;
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (final == null && clock.Elapsed < TestEnv.Patience)
            {
                final = results.FirstOrDefault(r => r.Id == request.Id);
                if (final == null) Thread.Sleep(20);
            }
            Assert.IsNotNull(final, "the daemon ended the cancelled request with a result");
            Assert.AreEqual(FinishReason.Cancelled, final.FinishReason);
            Assert.Less(final.CompletionTokens, maxTokens, "the daemon stopped before max_tokens");
            Assert.AreEqual(seenWhenCancelled, seen, "no piece reached the callback after cancelling");
            TestEnv.Await(_client.PingAsync());
        }

        [Test]
        public void AlreadyCancelledTokenSendsNothing()
        {
            var cts = new CancellationTokenSource();
            cts.Cancel();
            Task<Completion> task = _client.GenerateAsync(Chat("alpha", "Hi", 4), null, cts.Token);
            try { task.Wait(TestEnv.Patience); }
            catch (AggregateException) { }
            Assert.IsTrue(task.IsCanceled);
        }

        [Test]
        public void UnknownAdapterFaultsWithItsCode()
        {
            var e = Fault(_client.GenerateAsync(Chat("ghost", "Boo", 4)));
            Assert.AreEqual(ErrorCodes.UnknownAdapter, e.Code);
            StringAssert.Contains("ghost", e.Message);
            Assert.IsNotNull(e.RequestId);
            // An error answers one request; the connection stays usable.
            Assert.Greater(TestEnv.Await(_client.GenerateAsync(Chat("alpha", "Still there?", 4))).CompletionTokens, 0);
        }

        [Test]
        public void InvalidRequestFaultsWithBadMessage()
        {
            // Neither prompt nor messages: the daemon's validation refuses it.
            var e = Fault(_client.GenerateAsync(new Generate { MaxTokens = 4 }));
            Assert.AreEqual(ErrorCodes.BadMessage, e.Code);
            TestEnv.Await(_client.PingAsync());
        }

        [Test]
        public void AThrowingTokenCallbackFaultsTheTask()
        {
            var boom = new InvalidOperationException("game code failed");
            Task<Completion> task = _client.GenerateAsync(Chat("alpha", "Hi", 16), piece => { throw boom; });
            try
            {
                task.Wait(TestEnv.Patience);
                Assert.Fail("the task should fault");
            }
            catch (AggregateException e)
            {
                Assert.AreSame(boom, e.InnerException, "the callback's own exception, not swallowed");
            }
            TestEnv.Await(_client.PingAsync());
        }

        [Test]
        public void WrongTokenIsRefused()
        {
            Task<LoraloomClient> connect = LoraloomClient.ConnectAsync(TestEnv.Url, "not-the-token");
            var e = Fault(connect);
            Assert.AreEqual(ErrorCodes.Unauthorized, e.Code);
        }

        [Test]
        public void ConnectsThroughTheRuntimeFile()
        {
            var options = new LoraloomClientOptions { RuntimeFile = TestEnv.Require("LORALOOM_TEST_RUNTIME_FILE") };
            LoraloomClient viaFile = TestEnv.Await(LoraloomClient.ConnectAsync(options));
            try
            {
                TestEnv.Await(viaFile.PingAsync());
                Assert.AreEqual(_client.Welcome.Server, viaFile.Welcome.Server);
            }
            finally
            {
                viaFile.Dispose();
            }
        }

        [Test]
        public void AddingAnAdapterFolderRaisesAnAdapterEvent()
        {
            string name = "delta_" + Guid.NewGuid().ToString("N").Substring(0, 8);
            var events = new BlockingCollection<AdapterEvent>();
            _client.AdapterChanged += e => { if (e.Adapter != null && e.Adapter.Name == name) events.Add(e); };
            string dir = TestEnv.AdapterDir;
            string target = Path.Combine(dir, name);
            // Build the copy under a hidden name and rename it into place, as an editor's save would.
            string staging = Path.Combine(dir, "." + name + ".tmp");
            CopyFolder(Path.Combine(dir, "alpha"), staging);
            Directory.Move(staging, target);
            try
            {
                AdapterEvent added = Next(events, AdapterEventKind.Added);
                Assert.AreEqual(AdapterKind.Text, added.Adapter.Kind);
                Assert.AreEqual(AdapterStatus.Ready, added.Adapter.Status);
                Assert.IsTrue(_client.Adapters.Any(a => a.Name == name), "the client's adapter list follows events");
                Completion done = TestEnv.Await(_client.GenerateAsync(Chat(name, "New voice?", 4)));
                Assert.AreEqual(added.Adapter.Version, done.AdapterVersions[name]);
            }
            finally
            {
                Directory.Delete(target, true);
            }
            Next(events, AdapterEventKind.Removed);
            Assert.IsFalse(_client.Adapters.Any(a => a.Name == name));
        }

        [Test]
        public void GeneratesAnImageWhenTheDaemonHasAnImageModel()
        {
            // A second daemon with an image model, when the driver started one; else the shared daemon.
            string imageUrl = Environment.GetEnvironmentVariable("LORALOOM_TEST_IMAGE_URL");
            LoraloomClient client = string.IsNullOrEmpty(imageUrl) ? _client
                : TestEnv.Await(LoraloomClient.ConnectAsync(imageUrl, TestEnv.Require("LORALOOM_TEST_IMAGE_TOKEN")));
            try
            {
                if (client.Welcome.ImageModel == null)
                    Assert.Ignore("not run: the test daemon has no image model (welcome.image_model is null)");
                GenerateOneImage(client);
            }
            finally
            {
                if (client != _client) client.Dispose();
            }
        }

        static void GenerateOneImage(LoraloomClient client)
        {
            var steps = new List<int>();
            ImageResult result = TestEnv.Await(client.GenerateImageAsync(new GenerateImage
            {
                Prompt = "a pixel-art map tile",
                Width = 64,
                Height = 64,
                Steps = 2,
                Seed = 7,
            }, p => { lock (steps) steps.Add(p.Step); }), TimeSpan.FromSeconds(120));
            Assert.AreEqual(FinishReason.Stop, result.FinishReason);
            Assert.AreEqual(1, result.Images.Count);
            CollectionAssert.AreEqual(new byte[] { 0x89, 0x50, 0x4e, 0x47 }, result.Images[0].Take(4).ToArray(), "a PNG file");
            CollectionAssert.AreEqual(new[] { 1, 2 }, steps);
            Assert.AreEqual(64, result.Width);
            Assert.AreEqual(7, result.Seed);
        }

        internal static LoraloomException Fault(Task task)
        {
            try
            {
                task.Wait(TestEnv.Patience);
            }
            catch (AggregateException e)
            {
                var error = e.InnerException as LoraloomException;
                Assert.IsNotNull(error, "expected a LoraloomException, got " + e.InnerException);
                return error;
            }
            Assert.Fail(task.IsCompleted ? "the task succeeded instead of faulting" : "the task did not finish");
            return null;
        }

        static AdapterEvent Next(BlockingCollection<AdapterEvent> events, string kind)
        {
            AdapterEvent e;
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (clock.Elapsed < TestEnv.Patience)
            {
                if (!events.TryTake(out e, TimeSpan.FromSeconds(1))) continue;
                if (e.Event == kind) return e;
                if (e.Event == AdapterEventKind.Rejected) Assert.Fail("the adapter was rejected: " + e.Reason);
            }
            Assert.Fail("no '" + kind + "' adapter event within " + TestEnv.Patience.TotalSeconds + " s");
            return null;
        }

        static void CopyFolder(string from, string to)
        {
            Directory.CreateDirectory(to);
            foreach (string file in Directory.GetFiles(from)) File.Copy(file, Path.Combine(to, Path.GetFileName(file)));
            foreach (string sub in Directory.GetDirectories(from)) CopyFolder(sub, Path.Combine(to, Path.GetFileName(sub)));
        }
    }
}
