"""cnnserve on Ray Serve: one deployment per model, each replica a protocol-free core
(app/serving) for that model alone, behind one ingress deployment that runs the same HTTP app as
``cnnserve serve``. Optional: ``pip install 'cnnserve[ray]'``; nothing else imports this package."""
