from hvcpolicy.cli.main import run

run()
