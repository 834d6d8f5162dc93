"""The console's static files (HTML, CSS, JavaScript), served by gateway/admin/console.py."""
