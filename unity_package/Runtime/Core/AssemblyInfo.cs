using System.Runtime.CompilerServices;

// The tests read golden JSON and runtime files with the same small JSON reader the client uses.
[assembly: InternalsVisibleTo("Loraloom.Core.Tests")]
