"""Scale-out on Ray (`pip install 'tokenloom[ray]'`): replicas of the server behind one endpoint, routed by the
prefix cache's block hashes (`tokenloom serve --replicas N`). Nothing here imports Ray until replicas start."""
