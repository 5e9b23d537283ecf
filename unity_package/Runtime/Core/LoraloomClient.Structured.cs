using System;
using System.Threading;
using System.Threading.Tasks;

namespace Loraloom.Core
{
    // Structured output: the JSON of a schema request, parsed or read into a C# type. Choices,
    // regexes, grammars and tools need nothing beyond GenerateAsync: set them on the request and
    // read Completion.Text / ToolCalls / Constraint.
    public sealed partial class LoraloomClient
    {
        /// <summary>
        /// Generates JSON valid against <c>request.JsonSchema</c> and returns it parsed: the tree the
        /// msgpack reader gives (null, bool, long, double, string, List&lt;object&gt;,
        /// Dictionary&lt;string, object&gt;). Faults with <see cref="LoraloomException"/>: the daemon's
        /// codes (<c>invalid_parameter</c> for a schema it cannot use), or
        /// <see cref="ResultConstraint.Incomplete"/> when the output ended before the JSON did
        /// (max_tokens, the context, a stop string).
        /// </summary>
        public async Task<object> GenerateJsonAsync(Generate request, Action<string> onToken = null,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (request == null) throw new ArgumentNullException("request");
            if (request.JsonSchema == null) throw new ArgumentException("request.JsonSchema is not set", "request");
            Completion done = await GenerateAsync(request, onToken, cancellationToken).ConfigureAwait(false);
            return done.EnsureSatisfied().Json;
        }

        /// <summary>
        /// As above, read into a <typeparamref name="T"/> (see <see cref="JsonMapper"/>). Without
        /// <c>request.JsonSchema</c>, the schema is <see cref="JsonSchema.For{T}"/> (the request
        /// object itself is not changed).
        /// </summary>
        public async Task<T> GenerateJsonAsync<T>(Generate request, Action<string> onToken = null,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (request == null) throw new ArgumentNullException("request");
            if (request.JsonSchema == null)
            {
                request = (Generate)request.WithId(request.Id);
                request.JsonSchema = JsonSchema.For<T>();
            }
            object json = await GenerateJsonAsync(request, onToken, cancellationToken).ConfigureAwait(false);
            return JsonMapper.ToObject<T>(json);
        }
    }
}
