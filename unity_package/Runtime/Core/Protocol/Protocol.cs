using System;

namespace Loraloom.Core
{
    /// <summary>Frames to messages and back (the C# side of bridge/codec.py).</summary>
    public static class Protocol
    {
        /// <summary>The protocol version this package speaks (hello.protocol).</summary>
        public const int Version = 1;

        public static byte[] Encode(ProtocolMessage message)
        {
            var writer = new MsgPackWriter();
            message.WriteTo(writer);
            return writer.ToArray();
        }

        public static ProtocolMessage Decode(byte[] frame) { return Decode(frame, 0, frame.Length); }

        /// <summary>
        /// Decodes a frame of either direction. Throws <see cref="LoraloomException"/> with code
        /// bad_frame (not one msgpack map) or bad_message (no or unknown type, or a field of the wrong
        /// kind). Unknown fields are skipped: a newer daemon may add some.
        /// </summary>
        public static ProtocolMessage Decode(byte[] frame, int offset, int count)
        {
            var reader = new MsgPackReader(frame, offset, count);
            string type;
            try
            {
                if (reader.PeekKind() != MsgPackKind.Map) throw new LoraloomException(ErrorCodes.BadFrame, "frame must be one msgpack map");
                // A structural pass first, so a truncated or padded frame is bad_frame (as in
                // bridge/codec.py) whatever field it breaks in.
                reader.Skip();
                if (!reader.AtEnd) throw new LoraloomException(ErrorCodes.BadFrame, "frame has bytes after its map");
                reader.Position = 0;
                type = FindType(reader);
            }
            catch (MsgPackException e)
            {
                throw new LoraloomException(ErrorCodes.BadFrame, "frame is not valid msgpack: " + e.Message);
            }
            if (type == null) throw new LoraloomException(ErrorCodes.BadMessage, "message has no 'type'");
            ProtocolMessage message = Create(type);
            if (message == null) throw new LoraloomException(ErrorCodes.BadMessage, "unknown message type '" + type + "'");
            reader.Position = 0;
            try
            {
                Wire.Read(reader, message);
            }
            catch (MsgPackException e)
            {
                throw new LoraloomException(ErrorCodes.BadMessage, "invalid '" + type + "' message: " + e.Message);
            }
            return message;
        }

        /// <summary>A new, empty message for a type name, or null when the type is unknown.</summary>
        public static ProtocolMessage Create(string type)
        {
            switch (type)
            {
                case Hello.TypeName: return new Hello();
                case Generate.TypeName: return new Generate();
                case GenerateImage.TypeName: return new GenerateImage();
                case Cancel.TypeName: return new Cancel();
                case ListAdapters.TypeName: return new ListAdapters();
                case Subscribe.TypeName: return new Subscribe();
                case Ping.TypeName: return new Ping();
                case Welcome.TypeName: return new Welcome();
                case Chunk.TypeName: return new Chunk();
                case Result.TypeName: return new Result();
                case Error.TypeName: return new Error();
                case AdapterList.TypeName: return new AdapterList();
                case AdapterEvent.TypeName: return new AdapterEvent();
                case Pong.TypeName: return new Pong();
                case ImageProgress.TypeName: return new ImageProgress();
                case ImageResult.TypeName: return new ImageResult();
                default: return null;
            }
        }

        /// <summary>Every message type name of this protocol version.</summary>
        public static readonly string[] TypeNames =
        {
            Hello.TypeName, Generate.TypeName, GenerateImage.TypeName, Cancel.TypeName, ListAdapters.TypeName,
            Subscribe.TypeName, Ping.TypeName, Welcome.TypeName, Chunk.TypeName, Result.TypeName, Error.TypeName,
            AdapterList.TypeName, AdapterEvent.TypeName, Pong.TypeName, ImageProgress.TypeName, ImageResult.TypeName,
        };

        // Field order is free on the wire, so "type" may come after other fields: look for it first
        // without allocating anything but its value.
        static string FindType(MsgPackReader reader)
        {
            int count = reader.ReadMapHeader();
            for (int i = 0; i < count; i++)
            {
                if (reader.PeekKind() != MsgPackKind.String) throw new MsgPackException("map key is not a string");
                string key = reader.ReadString();
                if (key == "type")
                    return reader.PeekKind() == MsgPackKind.String ? reader.ReadString() : null;
                reader.Skip();
            }
            return null;
        }
    }

    /// <summary>The stable error codes of the protocol's error event, plus the client's own.</summary>
    public static class ErrorCodes
    {
        public const string BadFrame = "bad_frame";
        public const string BadMessage = "bad_message";
        public const string FrameTooLarge = "frame_too_large";
        public const string UnsupportedVersion = "unsupported_version";
        public const string Unauthorized = "unauthorized";
        public const string HandshakeRequired = "handshake_required";
        public const string DuplicateId = "duplicate_id";
        public const string UnknownRequest = "unknown_request";
        public const string TooManyRequests = "too_many_requests";
        public const string UnknownAdapter = "unknown_adapter";
        public const string AdapterUnavailable = "adapter_unavailable";
        public const string PromptTooLong = "prompt_too_long";
        public const string InvalidParameter = "invalid_parameter";
        public const string ModelUnavailable = "model_unavailable";
        public const string ShuttingDown = "shutting_down";
        public const string Internal = "internal";

        // Raised by this client, never sent by the daemon.
        /// <summary>No daemon could be found or reached (runtime file missing, nobody listening).</summary>
        public const string DaemonNotFound = "daemon_not_found";
        /// <summary>The connection closed while the request was in flight.</summary>
        public const string ConnectionClosed = "connection_closed";
        /// <summary>The daemon did not answer in time (handshake or a request's own timeout).</summary>
        public const string Timeout = "timeout";
    }

    /// <summary>
    /// Every failure of the package: a daemon's error event (Code is its protocol code) or one of
    /// the client's own (see <see cref="ErrorCodes"/>). Tasks fault with it; nothing is swallowed.
    /// </summary>
    public class LoraloomException : Exception
    {
        public string Code { get; private set; }

        /// <summary>The request the error is about, when there is one.</summary>
        public string RequestId { get; private set; }

        public LoraloomException(string code, string message, string requestId = null, Exception inner = null)
            : base(code + ": " + message, inner)
        {
            Code = code;
            RequestId = requestId;
        }
    }
}
