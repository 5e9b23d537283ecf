using System.Threading.Tasks;

namespace Loraloom.Core
{
    static class TaskExtensions
    {
        /// <summary>Marks a fire-and-forget task's failure as seen, so it never surfaces as an unobserved exception.</summary>
        public static void Forget(this Task task)
        {
            task.ContinueWith(t => { var seen = t.Exception; return seen; }, TaskContinuationOptions.OnlyOnFaulted);
        }
    }
}
