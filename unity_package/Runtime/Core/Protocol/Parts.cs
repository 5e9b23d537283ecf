using System.Collections.Generic;

namespace Loraloom.Core
{
    // Parts of messages, field for field as in bridge/messages.py (PROTOCOL.md, "Parts").
    // Enumerated strings stay strings, so a newer daemon's value never breaks an older client;
    // the known values are constants beside each class.

    /// <summary>One adapter of a request and the scale its update is multiplied by (0 = no effect).</summary>
    public sealed class AdapterRef : WireMap
    {
        public string Name;
        public double Scale = 1.0;

        public AdapterRef() { }

        public AdapterRef(string name, double scale = 1.0)
        {
            Name = name;
            Scale = scale;
        }

        /// <summary>"name" or "name:0.5", the same spelling the Python client and CLI accept.</summary>
        public static AdapterRef Parse(string spec)
        {
            int colon = spec.LastIndexOf(':');
            double scale;
            if (colon > 0 && double.TryParse(spec.Substring(colon + 1), System.Globalization.NumberStyles.Float,
                    System.Globalization.CultureInfo.InvariantCulture, out scale))
                return new AdapterRef(spec.Substring(0, colon), scale);
            return new AdapterRef(spec);
        }

        internal override int WriteFields(MsgPackWriter w)
        {
            return Wire.Field(w, "name", Name) + Wire.Field(w, "scale", Scale);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "name": Name = r.ReadString(); return true;
                case "scale": Scale = r.ReadDouble(); return true;
                default: return false;
            }
        }

        public override string ToString() { return Name + ":" + Scale.ToString(System.Globalization.CultureInfo.InvariantCulture); }
    }

    public static class ChatRole
    {
        public const string System = "system";
        public const string User = "user";
        public const string Assistant = "assistant";
    }

    /// <summary>One turn of a conversation; rendered with the model's chat template.</summary>
    public sealed class ChatMessage : WireMap
    {
        public string Role;
        public string Content;

        public ChatMessage() { }

        public ChatMessage(string role, string content)
        {
            Role = role;
            Content = content;
        }

        internal override int WriteFields(MsgPackWriter w)
        {
            return Wire.Field(w, "role", Role) + Wire.Field(w, "content", Content);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "role": Role = r.ReadString(); return true;
                case "content": Content = r.ReadString(); return true;
                default: return false;
            }
        }
    }

    public static class AdapterKind
    {
        public const string Text = "text";
        public const string Image = "image";
    }

    public static class AdapterStatus
    {
        public const string Ready = "ready";
        public const string Loading = "loading";
        public const string Failed = "failed";
        public const string Removed = "removed";
    }

    /// <summary>What the daemon knows about one adapter.</summary>
    public sealed class AdapterInfo : WireMap
    {
        public string Name;
        public string Kind;
        public string Status;
        public int? Version;
        public string Hash;
        public int? Rank;
        public List<string> Targets = new List<string>();
        public string Error;

        internal override int WriteFields(MsgPackWriter w)
        {
            return Wire.Field(w, "name", Name) + Wire.Field(w, "kind", Kind) + Wire.Field(w, "status", Status)
                + Wire.Field(w, "version", Version) + Wire.Field(w, "hash", Hash) + Wire.Field(w, "rank", Rank)
                + Wire.Field(w, "targets", Targets) + Wire.Field(w, "error", Error);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "name": Name = r.ReadString(); return true;
                case "kind": Kind = r.ReadString(); return true;
                case "status": Status = r.ReadString(); return true;
                case "version": Version = Wire.NullableInt(r); return true;
                case "hash": Hash = r.ReadStringOrNull(); return true;
                case "rank": Rank = Wire.NullableInt(r); return true;
                case "targets": Targets = Wire.Strings(r) ?? new List<string>(); return true;
                case "error": Error = r.ReadStringOrNull(); return true;
                default: return false;
            }
        }

        public override string ToString()
        {
            return Name + " (" + Kind + ", " + Status + (Version.HasValue ? ", v" + Version.Value : "") + ")";
        }
    }

    /// <summary>A loaded model, as announced in the handshake.</summary>
    public sealed class ModelInfo : WireMap
    {
        public string Name;
        public string Kind;
        public string Device;
        public string Dtype;
        public int? ContextLength;
        /// <summary>True for the built-in image model that only draws noise.</summary>
        public bool Placeholder;

        internal override int WriteFields(MsgPackWriter w)
        {
            return Wire.Field(w, "name", Name) + Wire.Field(w, "kind", Kind) + Wire.Field(w, "device", Device)
                + Wire.Field(w, "dtype", Dtype) + Wire.Field(w, "context_length", ContextLength)
                + Wire.Field(w, "placeholder", Placeholder);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "name": Name = r.ReadString(); return true;
                case "kind": Kind = r.ReadString(); return true;
                case "device": Device = r.ReadString(); return true;
                case "dtype": Dtype = r.ReadString(); return true;
                case "context_length": ContextLength = Wire.NullableInt(r); return true;
                case "placeholder": Placeholder = r.ReadBool(); return true;
                default: return false;
            }
        }
    }

    /// <summary>The limits this daemon enforces, so clients can check before sending.</summary>
    public sealed class Limits : WireMap
    {
        public int MaxFrameBytes;
        public int MaxInflightPerConnection;
        public int MaxPromptTokens;
        public int MaxNewTokens;
        public int MaxAdaptersPerRequest;

        internal override int WriteFields(MsgPackWriter w)
        {
            return Wire.Field(w, "max_frame_bytes", MaxFrameBytes)
                + Wire.Field(w, "max_inflight_per_connection", MaxInflightPerConnection)
                + Wire.Field(w, "max_prompt_tokens", MaxPromptTokens)
                + Wire.Field(w, "max_new_tokens", MaxNewTokens)
                + Wire.Field(w, "max_adapters_per_request", MaxAdaptersPerRequest);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "max_frame_bytes": MaxFrameBytes = r.ReadInt32(); return true;
                case "max_inflight_per_connection": MaxInflightPerConnection = r.ReadInt32(); return true;
                case "max_prompt_tokens": MaxPromptTokens = r.ReadInt32(); return true;
                case "max_new_tokens": MaxNewTokens = r.ReadInt32(); return true;
                case "max_adapters_per_request": MaxAdaptersPerRequest = r.ReadInt32(); return true;
                default: return false;
            }
        }
    }

    /// <summary>Where the time of one request went, in milliseconds.</summary>
    public sealed class Timings : WireMap
    {
        public double QueuedMs;
        public double? FirstTokenMs;
        public double TotalMs;
        public double? TokensPerS;

        internal override int WriteFields(MsgPackWriter w)
        {
            return Wire.Field(w, "queued_ms", QueuedMs) + Wire.Field(w, "first_token_ms", FirstTokenMs)
                + Wire.Field(w, "total_ms", TotalMs) + Wire.Field(w, "tokens_per_s", TokensPerS);
        }

        internal override bool ReadField(string key, MsgPackReader r)
        {
            switch (key)
            {
                case "queued_ms": QueuedMs = r.ReadDouble(); return true;
                case "first_token_ms": FirstTokenMs = Wire.NullableDouble(r); return true;
                case "total_ms": TotalMs = r.ReadDouble(); return true;
                case "tokens_per_s": TokensPerS = Wire.NullableDouble(r); return true;
                default: return false;
            }
        }
    }
}
