using System.Collections.Generic;
using System.Globalization;

namespace Loraloom.Core
{
    // Hand-written members of the parts of messages. The parts themselves (fields, defaults,
    // reading and writing) are generated from bridge/messages.py into Parts.g.cs.

    public sealed partial class AdapterRef
    {
        public AdapterRef() { }

        /// <summary>The adapter <paramref name="name"/> at its default scale.</summary>
        public AdapterRef(string name)
        {
            Name = name;
        }

        public AdapterRef(string name, double scale)
        {
            Name = name;
            Scale = scale;
        }

        /// <summary>"name" or "name:0.5", the same spelling the Python client and CLI accept.</summary>
        public static AdapterRef Parse(string spec)
        {
            int colon = spec.LastIndexOf(':');
            double scale;
            if (colon > 0 && double.TryParse(spec.Substring(colon + 1), NumberStyles.Float, CultureInfo.InvariantCulture,
                    out scale))
                return new AdapterRef(spec.Substring(0, colon), scale);
            return new AdapterRef(spec);
        }

        public override string ToString() { return Name + ":" + Scale.ToString(CultureInfo.InvariantCulture); }
    }

    public sealed partial class ChatMessage
    {
        public ChatMessage() { }

        public ChatMessage(string role, string content)
        {
            Role = role;
            Content = content;
        }
    }

    public sealed partial class AdapterInfo
    {
        public override string ToString()
        {
            return Name + " (" + Kind + ", " + Status + (Version.HasValue ? ", v" + Version.Value : "") + ")";
        }
    }

    public sealed partial class Tool
    {
        public Tool() { }

        /// <summary>A function the model may call; <paramref name="parameters"/> is a JSON Schema object (null: any object).</summary>
        public Tool(string name, string description, Dictionary<string, object> parameters = null)
        {
            Name = name;
            Description = description ?? "";
            if (parameters != null) Parameters = parameters;
        }

        /// <summary>A tool whose arguments are a <typeparamref name="T"/> (see <see cref="JsonSchema.For{T}"/>); read them with <see cref="ToolCall.ArgumentsAs{T}"/>.</summary>
        public static Tool For<T>(string name, string description = "")
        {
            return new Tool(name, description, JsonSchema.For<T>());
        }
    }

    public sealed partial class ToolCall
    {
        /// <summary>The arguments read into a <typeparamref name="T"/> (see <see cref="JsonMapper"/>).</summary>
        public T ArgumentsAs<T>() { return JsonMapper.ToObject<T>(Arguments); }

        public override string ToString() { return Name + " " + Json.Write(Arguments); }
    }
}
