"""Lambda response streaming for a Python function (issue 17): Python's managed runtime cannot stream, so
a runtime loop of our own (started through ``AWS_LAMBDA_EXEC_WRAPPER``) speaks the Runtime API's streaming
mode, and the router reads the stream with ``InvokeWithResponseStream`` (``tierserve.backends.lambda_stream``).
Nothing heavy is imported here: the router and the CPU function both load this at cold start.
"""
