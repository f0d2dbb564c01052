"""The partner console: people who sign in, their sessions, and the pages.

The pages are rendered by the server and enhanced by small native ES
modules that call the same JSON API as any API key, so every change made in
the console passes the API's own checks and is recorded with the user who
made it.
"""
