"""specmq's OpenAI-compatible HTTP gateway: ``/v1/completions`` and ``/v1/chat/completions`` over the broker's
generate queue (``server``), the OpenAI request and response shapes (``openai_api``), chat prompt templates
(``chat``) and one job's output as the client sees it (``stream``)."""
