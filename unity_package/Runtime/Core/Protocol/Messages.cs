using System.Collections.Generic;

namespace Loraloom.Core
{
    // Every message of protocol version 1, field for field and in field order as bridge/messages.py
    // defines them (PROTOCOL.md is generated from that file). The golden-frame tests fail when this
    // file drifts from it.

    /// <summary>One frame: a msgpack map whose "type" names the message.</summary>
    public abstract class ProtocolMessage : WireMap
    {
        public abstract string Type { get; }

        /// <summary>The request id, or null for messages that are not about one request.</summary>
        public virtual string RequestId { get { return null; } }

        internal int TypeField(MsgPackWriter w) { return Wire.Field(w, "type", Type); }
    }

    /// <summary>A request: a message with a client-chosen id that events about it carry back.</summary>
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

    // ------------------------------------------------------------------ client -> daemon

    /// <summary>The first frame of every connection: protocol version, token and a name for logs.</summary>
    public sealed class Hello : ProtocolMessage
    {
        public const string TypeName = "hello";
        public override string Type { get { return TypeName; } }

        public int Protocol = Loraloom.Core.Protocol.Version;
        public string Token;
        public string Client = "unknown";

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "protocol", Protocol) + Wire.Field(w, "token", Token)
                + Wire.Field(w, "client", Client);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "protocol": Protocol = r.ReadInt32(); return true;
                case "token": Token = r.ReadString(); return true;
                case "client": Client = r.ReadString(); return true;
                default: return false;
            }
        }
    }

    /// <summary>
    /// Generate text on the base model plus a per-request mix of adapters. Give exactly one of
    /// <see cref="Prompt"/> (raw text, continued as is) or <see cref="Messages"/> (a chat, rendered
    /// with the model's template). No adapters means the base model. Leave <see cref="RequestMessage.Id"/>
    /// null and the client picks one.
    /// </summary>
    public sealed class Generate : RequestMessage
    {
        public const string TypeName = "generate";
        public override string Type { get { return TypeName; } }

        public List<AdapterRef> Adapters = new List<AdapterRef>();
        public string Prompt;
        public List<ChatMessage> Messages;
        public int MaxTokens = 256;
        /// <summary>0 is greedy.</summary>
        public double Temperature = 0.7;
        /// <summary>0 is off.</summary>
        public int TopK;
        public double TopP = 1.0;
        public double RepetitionPenalty = 1.0;
        public long? Seed;
        public List<string> Stop = new List<string>();
        /// <summary>False: no chunk events, only the final result.</summary>
        public bool Stream = true;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "adapters", Adapters)
                + Wire.Field(w, "prompt", Prompt) + Wire.Field(w, "messages", Messages)
                + Wire.Field(w, "max_tokens", MaxTokens) + Wire.Field(w, "temperature", Temperature)
                + Wire.Field(w, "top_k", TopK) + Wire.Field(w, "top_p", TopP)
                + Wire.Field(w, "repetition_penalty", RepetitionPenalty) + Wire.Field(w, "seed", Seed)
                + Wire.Field(w, "stop", Stop) + Wire.Field(w, "stream", Stream);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "adapters": Adapters = Wire.Maps<AdapterRef>(r) ?? new List<AdapterRef>(); return true;
                case "prompt": Prompt = r.ReadStringOrNull(); return true;
                case "messages": Messages = Wire.Maps<ChatMessage>(r); return true;
                case "max_tokens": MaxTokens = r.ReadInt32(); return true;
                case "temperature": Temperature = r.ReadDouble(); return true;
                case "top_k": TopK = r.ReadInt32(); return true;
                case "top_p": TopP = r.ReadDouble(); return true;
                case "repetition_penalty": RepetitionPenalty = r.ReadDouble(); return true;
                case "seed": Seed = Wire.NullableLong(r); return true;
                case "stop": Stop = Wire.Strings(r) ?? new List<string>(); return true;
                case "stream": Stream = r.ReadBool(); return true;
                default: return false;
            }
        }
    }

    /// <summary>Generate images on the image model plus a per-request mix of image adapters.</summary>
    public sealed class GenerateImage : RequestMessage
    {
        public const string TypeName = "generate_image";
        public override string Type { get { return TypeName; } }

        public string Prompt;
        public string NegativePrompt;
        public List<AdapterRef> Adapters = new List<AdapterRef>();
        public int Width = 512;
        public int Height = 512;
        public int Steps = 20;
        public double Guidance = 7.5;
        public long? Seed;
        public int Count = 1;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "prompt", Prompt)
                + Wire.Field(w, "negative_prompt", NegativePrompt) + Wire.Field(w, "adapters", Adapters)
                + Wire.Field(w, "width", Width) + Wire.Field(w, "height", Height) + Wire.Field(w, "steps", Steps)
                + Wire.Field(w, "guidance", Guidance) + Wire.Field(w, "seed", Seed) + Wire.Field(w, "count", Count);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "prompt": Prompt = r.ReadString(); return true;
                case "negative_prompt": NegativePrompt = r.ReadStringOrNull(); return true;
                case "adapters": Adapters = Wire.Maps<AdapterRef>(r) ?? new List<AdapterRef>(); return true;
                case "width": Width = r.ReadInt32(); return true;
                case "height": Height = r.ReadInt32(); return true;
                case "steps": Steps = r.ReadInt32(); return true;
                case "guidance": Guidance = r.ReadDouble(); return true;
                case "seed": Seed = Wire.NullableLong(r); return true;
                case "count": Count = r.ReadInt32(); return true;
                default: return false;
            }
        }
    }

    /// <summary>A request with nothing but its id (cancel, list_adapters, ping).</summary>
    public abstract class IdOnlyRequest : RequestMessage
    {
        internal override int WriteFields(MsgPackWriter w) { return TypeField(w) + Wire.Field(w, "id", Id); }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                default: return false;
            }
        }
    }

    /// <summary>Stop a request; it ends with a result whose finish_reason is "cancelled".</summary>
    public sealed class Cancel : IdOnlyRequest
    {
        public const string TypeName = "cancel";
        public override string Type { get { return TypeName; } }
    }

    /// <summary>Ask for the current adapter list; answered by "adapters".</summary>
    public sealed class ListAdapters : IdOnlyRequest
    {
        public const string TypeName = "list_adapters";
        public override string Type { get { return TypeName; } }
    }

    /// <summary>Answered by "pong" with the same id.</summary>
    public sealed class Ping : IdOnlyRequest
    {
        public const string TypeName = "ping";
        public override string Type { get { return TypeName; } }
    }

    /// <summary>Receive adapter events from now on; answered by "adapters" with the current list.</summary>
    public sealed class Subscribe : RequestMessage
    {
        public const string TypeName = "subscribe";
        public override string Type { get { return TypeName; } }

        public List<string> Topics = new List<string> { "adapters" };

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "topics", Topics);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "topics": Topics = Wire.Strings(r) ?? new List<string>(); return true;
                default: return false;
            }
        }
    }

    // ------------------------------------------------------------------ daemon -> client

    /// <summary>The answer to a valid hello.</summary>
    public sealed class Welcome : ProtocolMessage
    {
        public const string TypeName = "welcome";
        public override string Type { get { return TypeName; } }

        public int Protocol;
        /// <summary>The daemon's version.</summary>
        public string Server;
        public ModelInfo TextModel;
        public ModelInfo ImageModel;
        public List<AdapterInfo> Adapters = new List<AdapterInfo>();
        public Limits Limits;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "protocol", Protocol) + Wire.Field(w, "server", Server)
                + Wire.Field(w, "text_model", TextModel) + Wire.Field(w, "image_model", ImageModel)
                + Wire.Field(w, "adapters", Adapters) + Wire.Field(w, "limits", Limits);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "protocol": Protocol = r.ReadInt32(); return true;
                case "server": Server = r.ReadString(); return true;
                case "text_model": TextModel = Wire.MapOrNull<ModelInfo>(r); return true;
                case "image_model": ImageModel = Wire.MapOrNull<ModelInfo>(r); return true;
                case "adapters": Adapters = Wire.Maps<AdapterInfo>(r) ?? new List<AdapterInfo>(); return true;
                case "limits": Limits = Wire.MapOrNull<Limits>(r); return true;
                default: return false;
            }
        }
    }

    /// <summary>New text of a streaming request. Index counts chunks from 0; Tokens is the total so far.</summary>
    public sealed class Chunk : RequestMessage
    {
        public const string TypeName = "chunk";
        public override string Type { get { return TypeName; } }

        public string Text;
        public int Index;
        public int Tokens;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "text", Text)
                + Wire.Field(w, "index", Index) + Wire.Field(w, "tokens", Tokens);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "text": Text = r.ReadString(); return true;
                case "index": Index = r.ReadInt32(); return true;
                case "tokens": Tokens = r.ReadInt32(); return true;
                default: return false;
            }
        }
    }

    public static class FinishReason
    {
        public const string Stop = "stop";
        public const string Length = "length";
        public const string Cancelled = "cancelled";
    }

    /// <summary>The end of a text request: the whole text and why it stopped.</summary>
    public sealed class Result : RequestMessage
    {
        public const string TypeName = "result";
        public override string Type { get { return TypeName; } }

        public string Text;
        public string FinishReason;
        public int PromptTokens;
        public int CompletionTokens;
        /// <summary>Which version of each adapter served this request.</summary>
        public Dictionary<string, int> AdapterVersions = new Dictionary<string, int>();
        public Timings Timings;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "text", Text)
                + Wire.Field(w, "finish_reason", FinishReason) + Wire.Field(w, "prompt_tokens", PromptTokens)
                + Wire.Field(w, "completion_tokens", CompletionTokens)
                + Wire.Field(w, "adapter_versions", AdapterVersions) + Wire.Field(w, "timings", Timings);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "text": Text = r.ReadString(); return true;
                case "finish_reason": FinishReason = r.ReadString(); return true;
                case "prompt_tokens": PromptTokens = r.ReadInt32(); return true;
                case "completion_tokens": CompletionTokens = r.ReadInt32(); return true;
                case "adapter_versions": AdapterVersions = Wire.IntMap(r) ?? new Dictionary<string, int>(); return true;
                case "timings": Timings = Wire.MapOrNull<Timings>(r); return true;
                default: return false;
            }
        }
    }

    /// <summary>A refused frame or a failed request. Id is null when the frame had no readable id.</summary>
    public sealed class Error : ProtocolMessage
    {
        public const string TypeName = "error";
        public override string Type { get { return TypeName; } }

        public string Id;
        /// <summary>One of <see cref="ErrorCodes"/>.</summary>
        public string Code;
        public string Message;

        public override string RequestId { get { return Id; } }

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "code", Code)
                + Wire.Field(w, "message", Message);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadStringOrNull(); return true;
                case "code": Code = r.ReadString(); return true;
                case "message": Message = r.ReadString(); return true;
                default: return false;
            }
        }
    }

    /// <summary>The current adapter list: the "adapters" message, answer to list_adapters and subscribe.</summary>
    public sealed class AdapterList : RequestMessage
    {
        public const string TypeName = "adapters";
        public override string Type { get { return TypeName; } }

        public List<AdapterInfo> Adapters = new List<AdapterInfo>();

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "adapters", Adapters);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "adapters": Adapters = Wire.Maps<AdapterInfo>(r) ?? new List<AdapterInfo>(); return true;
                default: return false;
            }
        }
    }

    public static class AdapterEventKind
    {
        public const string Added = "added";
        public const string Updated = "updated";
        public const string Removed = "removed";
        public const string Rejected = "rejected";
    }

    /// <summary>An adapter changed on disk and the daemon acted on it (sent to subscribers).</summary>
    public sealed class AdapterEvent : ProtocolMessage
    {
        public const string TypeName = "adapter_event";
        public override string Type { get { return TypeName; } }

        /// <summary>One of <see cref="AdapterEventKind"/>.</summary>
        public string Event;
        public AdapterInfo Adapter;
        public int? PreviousVersion;
        /// <summary>For "rejected": what was wrong with the new files.</summary>
        public string Reason;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "event", Event) + Wire.Field(w, "adapter", Adapter)
                + Wire.Field(w, "previous_version", PreviousVersion) + Wire.Field(w, "reason", Reason);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "event": Event = r.ReadString(); return true;
                case "adapter": Adapter = Wire.MapOrNull<AdapterInfo>(r); return true;
                case "previous_version": PreviousVersion = Wire.NullableInt(r); return true;
                case "reason": Reason = r.ReadStringOrNull(); return true;
                default: return false;
            }
        }

        public override string ToString() { return Event + " " + Adapter + (Reason != null ? ": " + Reason : ""); }
    }

    /// <summary>The answer to ping; ServerTime is the daemon's wall clock in seconds.</summary>
    public sealed class Pong : RequestMessage
    {
        public const string TypeName = "pong";
        public override string Type { get { return TypeName; } }

        public double ServerTime;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "server_time", ServerTime);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "server_time": ServerTime = r.ReadDouble(); return true;
                default: return false;
            }
        }
    }

    /// <summary>One denoising step of an image request finished (Step counts from 1 to Total).</summary>
    public sealed class ImageProgress : RequestMessage
    {
        public const string TypeName = "image_progress";
        public override string Type { get { return TypeName; } }

        public int Step;
        public int Total;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "step", Step) + Wire.Field(w, "total", Total);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "step": Step = r.ReadInt32(); return true;
                case "total": Total = r.ReadInt32(); return true;
                default: return false;
            }
        }
    }

    /// <summary>The end of an image request: PNG files, plus the seed that made them.</summary>
    public sealed class ImageResult : RequestMessage
    {
        public const string TypeName = "image_result";
        public override string Type { get { return TypeName; } }

        /// <summary>One PNG file per image.</summary>
        public List<byte[]> Images = new List<byte[]>();
        public long Seed;
        public int Width;
        public int Height;
        public string FinishReason = Loraloom.Core.FinishReason.Stop;
        public Dictionary<string, int> AdapterVersions = new Dictionary<string, int>();
        public Timings Timings;

        internal override int WriteFields(MsgPackWriter w)
        {
            return TypeField(w) + Wire.Field(w, "id", Id) + Wire.Field(w, "images", Images)
                + Wire.Field(w, "seed", Seed) + Wire.Field(w, "width", Width) + Wire.Field(w, "height", Height)
                + Wire.Field(w, "finish_reason", FinishReason)
                + Wire.Field(w, "adapter_versions", AdapterVersions) + Wire.Field(w, "timings", Timings);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "type": r.Skip(); return true;
                case "id": Id = r.ReadString(); return true;
                case "images": Images = Wire.Binaries(r) ?? new List<byte[]>(); return true;
                case "seed": Seed = r.ReadInt64(); return true;
                case "width": Width = r.ReadInt32(); return true;
                case "height": Height = r.ReadInt32(); return true;
                case "finish_reason": FinishReason = r.ReadString(); return true;
                case "adapter_versions": AdapterVersions = Wire.IntMap(r) ?? new Dictionary<string, int>(); return true;
                case "timings": Timings = Wire.MapOrNull<Timings>(r); return true;
                default: return false;
            }
        }
    }
}
