"""Images and videos from a request, taken in memory: guarded URL fetches, decoding within budgets, sizing."""
