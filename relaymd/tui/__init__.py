"""The Textual operator console (`relaymd`). Imported only by the console command: the server
and the worker never import Textual."""
