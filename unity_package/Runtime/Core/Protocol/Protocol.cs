using System;

namespace Loraloom.Core
{
    // Encoding and decoding; the version, the type names and Create (type name -> message) are
    // generated from bridge/messages.py into Protocol.g.cs.
    public static partial class Protocol
    {
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

    /// <summary>
    /// Every failure of the package: a daemon's error event (Code is its protocol code) or one of
    /// the client's own (see <see cref="ErrorCodes"/>). Tasks fault with it; nothing is swallowed.
    /// </summary>
    public class LoraloomException : Exception
    {
        public string Code { get; private set; }

        /// <summary>What went wrong, without the code (<see cref="Exception.Message"/> is "code: reason").</summary>
        public string Reason { get; private set; }

        /// <summary>The request the error is about, when there is one.</summary>
        public string RequestId { get; private set; }

        public LoraloomException(string code, string message, string requestId = null, Exception inner = null)
            : base(code + ": " + message, inner)
        {
            Code = code;
            Reason = message;
            RequestId = requestId;
        }
    }
}
