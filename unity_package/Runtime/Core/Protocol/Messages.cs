namespace Loraloom.Core
{
    // The bases of every message, and hand-written members of some. The messages themselves are
    // generated from bridge/messages.py into Messages.g.cs (`python -m bridge.gen`); the
    // golden-frame tests fail when that file drifts from the models.

    /// <summary>One frame: a msgpack map whose "type" names the message.</summary>
    public abstract class ProtocolMessage : WireMap
    {
        public abstract string Type { get; }

        /// <summary>The request id, or null for messages that are not about one request.</summary>
        public virtual string RequestId { get { return null; } }

        internal int TypeField(MsgPackWriter w) { return Wire.Field(w, "type", Type); }
    }

    /// <summary>
    /// A request, or an event about one: a message with a client-chosen id that the events about it
    /// carry back. Leave <see cref="Id"/> null on a request and the client picks one.
    /// </summary>
    public abstract class RequestMessage : ProtocolMessage
    {
        public string Id;

        public override string RequestId { get { return Id; } }

        /// <summary>A shallow copy carrying another id, so the caller's request object is never changed.</summary>
        internal RequestMessage WithId(string id)
        {
            var copy = (RequestMessage)MemberwiseClone();
            copy.Id = id;
            return copy;
        }
    }

    /// <summary>A request with nothing but its id (cancel, list_adapters, ping).</summary>
    public abstract class IdOnlyRequest : RequestMessage
    {
    }

    public sealed partial class AdapterEvent
    {
        public override string ToString() { return Event + " " + Adapter + (Reason != null ? ": " + Reason : ""); }
    }

    /// <summary>The values of <c>Generate.ToolChoice</c> besides a tool's name.</summary>
    public static class ToolChoice
    {
        /// <summary>The model answers in text or makes one call.</summary>
        public const string Auto = "auto";
        /// <summary>The model makes one call, of any of the tools.</summary>
        public const string Required = "required";
        /// <summary>The model answers in text; the tools are not shown to it.</summary>
        public const string None = "none";
    }
}
