using System;
using System.Threading;
using System.Threading.Tasks;

namespace Loraloom.Core
{
    // The GPU budget the game sets (set_budget, its budget answer, and frame). The daemon ends a
    // client's budget when its connection closes, so the client keeps the last one it set and sends
    // it again on every new connection, before any request goes out there.
    public sealed partial class LoraloomClient
    {
        static readonly Frame FrameMessage = new Frame();
        // The frame that carries a measured time: one per client, reused, since a frame is sent
        // only once the previous one went out (allocation-light in the player loop).
        readonly Frame _measuredFrame = new Frame();
        readonly object _frameGate = new object();
        SetBudget _keptBudget;
        Task _frameSend = Task.FromResult(true);
        long _framesSent;
        long _framesSkipped;

        /// <summary>The daemon's answer to every budget this client set: by <see cref="SetBudgetAsync"/> and again on each reconnection.</summary>
        public event Action<Budget> BudgetApplied;

        /// <summary>The daemon refused the kept budget on a new connection (the connection stays up, without the budget).</summary>
        public event Action<LoraloomException> BudgetFailed;

        /// <summary>A copy of the budget sent on every connection (null: none).</summary>
        public SetBudget KeptBudget
        {
            get { lock (_gate) return _keptBudget != null ? CopyBudget(_keptBudget, null) : null; }
        }

        /// <summary><c>frame</c> messages sent, and frames not reported (no connection, or the previous one still on its way).</summary>
        public long FramesSent { get { return Interlocked.Read(ref _framesSent); } }
        public long FramesSkipped { get { return Interlocked.Read(ref _framesSkipped); } }

        /// <summary>
        /// Limits the GPU time the daemon takes while this client is connected, and keeps the limit
        /// for every later connection. Null (or a budget with nothing set) lifts this client's limit.
        /// Returns the daemon's answer: what is in force now. Throws ArgumentOutOfRangeException
        /// for values the protocol does not take (nothing is sent then).
        /// </summary>
        public async Task<Budget> SetBudgetAsync(SetBudget budget, CancellationToken cancellationToken = default(CancellationToken))
        {
            SetBudget copy = budget != null ? CopyBudget(budget, null) : new SetBudget();
            Validate(copy);
            SetBudget previous;
            lock (_gate)
            {
                previous = _keptBudget;
                _keptBudget = IsEmpty(copy) ? null : copy;
            }
            var pending = new ReplyRequest<Budget>(NextId());
            Budget reply;
            try
            {
                reply = await RunAsync(copy, pending, pending.Task, cancellationToken).ConfigureAwait(false);
            }
            catch (LoraloomException)
            {
                // Refused: the budget kept for reconnections stays the one the daemon last took.
                lock (_gate)
                {
                    if (_keptBudget == copy || (_keptBudget == null && IsEmpty(copy))) _keptBudget = previous;
                }
                throw;
            }
            Raise(BudgetApplied, reply);
            return reply;
        }

        /// <summary>
        /// A frame of the game starts now (for a budget with <c>FrameSync</c>): sends the few bytes of
        /// a <c>frame</c> message. Never blocks and never throws: false when the frame was not
        /// reported (not connected, or the previous frame's message is still being sent).
        /// </summary>
        public bool ReportFrame()
        {
            return ReportFrame(null);
        }

        /// <summary>
        /// As <see cref="ReportFrame()"/>, with the GPU time the game's own work took in its last
        /// frame, in ms, as the engine measured it: the daemon then sizes the game's part of a frame
        /// from these reports instead of <c>FrameSync.GameMs</c>. Null, NaN, or a value outside
        /// 0..1000 (what the protocol takes) is left out: the frame still goes out, without it.
        /// </summary>
        public bool ReportFrame(double? gameGpuMs)
        {
            Connection connection;
            lock (_gate) connection = _connection;
            lock (_frameGate)
            {
                if (connection == null || !_frameSend.IsCompleted)
                {
                    Interlocked.Increment(ref _framesSkipped);
                    return false;
                }
                Frame message = FrameMessage;
                if (IsReportable(gameGpuMs))
                {
                    _measuredFrame.GameMs = gameGpuMs;
                    message = _measuredFrame;
                }
                _frameSend = SendFrameAsync(connection, message);
            }
            return true;
        }

        // The protocol's range of Frame.game_ms (bridge/messages.py); NaN fails both comparisons.
        static bool IsReportable(double? ms)
        {
            return ms.HasValue && ms.Value >= 0.0 && ms.Value <= 1000.0;
        }

        async Task SendFrameAsync(Connection connection, Frame message)
        {
            try
            {
                await connection.Transport.SendAsync(message, CancellationToken.None).ConfigureAwait(false);
                Interlocked.Increment(ref _framesSent);
            }
            catch (Exception)
            {
                // A connection that cannot send is being lost; the read loop reports and reconnects.
                Interlocked.Increment(ref _framesSkipped);
            }
        }

        /// <summary>On a new connection, before it is attached: the kept budget goes out first.</summary>
        async Task ApplyKeptBudgetAsync(Connection connection, CancellationToken cancellationToken)
        {
            SetBudget kept;
            lock (_gate) kept = _keptBudget;
            if (kept == null) return;
            var pending = new ReplyRequest<Budget>(NextId());
            connection.Pending[pending.Id] = pending;
            try
            {
                await connection.Transport.SendAsync(CopyBudget(kept, pending.Id), cancellationToken).ConfigureAwait(false);
                Task finished = await Task.WhenAny(pending.Task, Task.Delay(_options.ConnectTimeout, cancellationToken)).ConfigureAwait(false);
                if (finished != pending.Task)
                {
                    cancellationToken.ThrowIfCancellationRequested();
                    throw new LoraloomException(ErrorCodes.Timeout, "no answer to 'set_budget' within " + _options.ConnectTimeout.TotalSeconds + " s");
                }
                if (pending.Task.IsFaulted)
                {
                    var refused = pending.Task.Exception.GetBaseException() as LoraloomException;
                    if (refused == null || refused.Code == ErrorCodes.ConnectionClosed) throw pending.Task.Exception.GetBaseException();
                    Raise(BudgetFailed, refused);
                    return;
                }
            }
            catch
            {
                connection.Transport.Dispose();
                throw;
            }
            Raise(BudgetApplied, pending.Task.Result);
        }

        static bool IsEmpty(SetBudget b)
        {
            bool noRates = b.TokensPerS == null || (!b.TokensPerS.Player.HasValue && !b.TokensPerS.Normal.HasValue && !b.TokensPerS.Background.HasValue);
            return !b.DutyCap.HasValue && noRates && b.FrameSync == null && !b.MaxStepMs.HasValue;
        }

        // The protocol's ranges (bridge/messages.py SetBudget), checked here so that a budget kept for
        // reconnections is one the daemon takes.
        static void Validate(SetBudget b)
        {
            if (b.DutyCap.HasValue) Check("DutyCap", b.DutyCap.Value, 0.0, 1.0, false);
            if (b.MaxStepMs.HasValue) Check("MaxStepMs", b.MaxStepMs.Value, 0.5, 10000.0, true);
            if (b.TokensPerS != null)
            {
                if (b.TokensPerS.Player.HasValue) Check("TokensPerS.Player", b.TokensPerS.Player.Value, 0.0, 1e6, false);
                if (b.TokensPerS.Normal.HasValue) Check("TokensPerS.Normal", b.TokensPerS.Normal.Value, 0.0, 1e6, false);
                if (b.TokensPerS.Background.HasValue) Check("TokensPerS.Background", b.TokensPerS.Background.Value, 0.0, 1e6, false);
            }
            if (b.FrameSync != null)
            {
                Check("FrameSync.PeriodMs", b.FrameSync.PeriodMs, 1.0, 1000.0, true);
                Check("FrameSync.GameMs", b.FrameSync.GameMs, 0.0, 1000.0, true);
                Check("FrameSync.MarginMs", b.FrameSync.MarginMs, 0.0, 100.0, true);
                Check("FrameSync.OverlapMs", b.FrameSync.OverlapMs, 0.0, 100.0, true);
            }
        }

        static void Check(string name, double value, double low, double high, bool lowIncluded)
        {
            bool ok = (lowIncluded ? value >= low : value > low) && value <= high;
            if (!ok)
                throw new ArgumentOutOfRangeException(name, value, name + " must be " + (lowIncluded ? "at least " : "more than ") + low + " and at most " + high);
        }

        static SetBudget CopyBudget(SetBudget b, string id)
        {
            return new SetBudget
            {
                Id = id,
                DutyCap = b.DutyCap,
                MaxStepMs = b.MaxStepMs,
                TokensPerS = b.TokensPerS == null ? null
                    : new TokenRates { Player = b.TokensPerS.Player, Normal = b.TokensPerS.Normal, Background = b.TokensPerS.Background },
                FrameSync = b.FrameSync == null ? null
                    : new FrameSync
                    {
                        PeriodMs = b.FrameSync.PeriodMs, GameMs = b.FrameSync.GameMs, MarginMs = b.FrameSync.MarginMs,
                        OverlapMs = b.FrameSync.OverlapMs,
                    },
            };
        }
    }
}
