"""The app shell: the `mailbeacon` command line, the runner that composes the components (one,
or all of them in `mailbeacon up`), and its development helpers. Only it imports components."""
