"""
The node agent: dataset backends, pure convergence and its runner, the agent-channel
client, peer transfer and the Docker volume plugin.
"""

__all__: list[str] = []
