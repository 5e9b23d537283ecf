using UnityEngine;

namespace Loraloom.Unity
{
    /// <summary>
    /// Marks a string field as an adapter name: the inspector shows a dropdown of the daemon's
    /// adapters of <see cref="Kind"/> (and still accepts a typed name while no daemon is running).
    /// </summary>
    public sealed class AdapterNameAttribute : PropertyAttribute
    {
        public readonly string Kind;

        public AdapterNameAttribute(string kind = Loraloom.Core.AdapterKind.Text) { Kind = kind; }
    }
}
